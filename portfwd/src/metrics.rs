//! The Prometheus endpoint's text (`--metrics ADDR`, `GET /metrics`; served by
//! [`gcb_ops`]), encoded with the `prometheus-client` crate (OpenMetrics text) through
//! [`gcb_ops::metrics_registry`].
//!
//! Every value but the histogram comes from the counters the stats log line prints
//! (nothing is counted twice): [`SERIES`] maps each stats name to one series. The
//! metrics:
//!
//! ```text
//! gcb_portfwd_mappings{proto="tcp|udp"}             gauge     forwarding rules installed
//! gcb_portfwd_epoch                                 gauge     this run's epoch (+1 per start)
//! gcb_portfwd_requests_total                        counter   control requests handled (requests)
//! gcb_portfwd_batches_total                         counter   request batches committed (batches)
//! gcb_portfwd_mapping_changes_total{op}             counter   op="added|reused|updated|deleted"
//! gcb_portfwd_queries_total                         counter   (queries)
//! gcb_portfwd_refused_total{reason}                 counter   reason="policy" (refused),
//!                                                             "rate_limited"
//! gcb_portfwd_rolled_back_total                     counter   (rolled_back)
//! gcb_portfwd_probe_rounds_total                    counter   (probe_rounds)
//! gcb_portfwd_probes_total{result="ok|refused|failed"} counter (probes_ok, ...)
//! gcb_portfwd_removed_by_probe_total                counter   (removed_by_probe)
//! gcb_portfwd_kernel_repairs_total                  counter   (kernel_repairs)
//! gcb_portfwd_conntrack_total{result="flushed|skipped"} counter (conntrack_flushed, ...)
//! gcb_portfwd_quarantined_total                     counter   (quarantined)
//! gcb_portfwd_errors_total{kind="mirror|kernel"}    counter   (mirror_errors, kernel_errors)
//! gcb_portfwd_control_datagrams_total               counter   (datagrams_received)
//! gcb_portfwd_dropped_total{reason="junk_datagram|wrong_interface"} counter
//! gcb_portfwd_error_replies_total                   counter   (error_replies)
//! gcb_portfwd_duplicates_total                      counter   retransmitted requests (duplicates)
//! gcb_portfwd_install_seconds                       histogram time to handle a batch of
//!     requests that installs rules (table, mirror fsync, nftables transaction), from
//!     0.5 ms to 4 s in powers of two
//! ```

use gcb_ops::metrics_registry::{
    encode_text, proto_gauge, register_series, series as s, Kind, Series,
};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::status::Status;

use Kind::{Counter as C, Gauge as G};

/// Every stats name and its series (`mappings` is by proto, from the list).
pub const SERIES: &[Series] = &[
    s(
        "epoch",
        "gcb_portfwd_epoch",
        G,
        None,
        "This run's epoch (one more at every start)",
    ),
    s(
        "requests",
        "gcb_portfwd_requests",
        C,
        None,
        "Control requests handled",
    ),
    s(
        "batches",
        "gcb_portfwd_batches",
        C,
        None,
        "Request batches committed",
    ),
    s(
        "added",
        "gcb_portfwd_mapping_changes",
        C,
        Some(("op", "added")),
        "Mapping changes, by operation",
    ),
    s(
        "reused",
        "gcb_portfwd_mapping_changes",
        C,
        Some(("op", "reused")),
        "",
    ),
    s(
        "updated",
        "gcb_portfwd_mapping_changes",
        C,
        Some(("op", "updated")),
        "",
    ),
    s(
        "deleted",
        "gcb_portfwd_mapping_changes",
        C,
        Some(("op", "deleted")),
        "",
    ),
    s(
        "queries",
        "gcb_portfwd_queries",
        C,
        None,
        "Query requests answered",
    ),
    s(
        "refused",
        "gcb_portfwd_refused",
        C,
        Some(("reason", "policy")),
        "Requests refused, by reason",
    ),
    s(
        "rate_limited",
        "gcb_portfwd_refused",
        C,
        Some(("reason", "rate_limited")),
        "",
    ),
    s(
        "rolled_back",
        "gcb_portfwd_rolled_back",
        C,
        None,
        "Changes rolled back after a mirror or kernel failure",
    ),
    s(
        "probe_rounds",
        "gcb_portfwd_probe_rounds",
        C,
        None,
        "Probe rounds completed",
    ),
    s(
        "probes_ok",
        "gcb_portfwd_probes",
        C,
        Some(("result", "ok")),
        "Management socket probes, by result",
    ),
    s(
        "probes_refused",
        "gcb_portfwd_probes",
        C,
        Some(("result", "refused")),
        "",
    ),
    s(
        "probes_failed",
        "gcb_portfwd_probes",
        C,
        Some(("result", "failed")),
        "",
    ),
    s(
        "removed_by_probe",
        "gcb_portfwd_removed_by_probe",
        C,
        None,
        "Mappings removed because their socket is gone",
    ),
    s(
        "kernel_repairs",
        "gcb_portfwd_kernel_repairs",
        C,
        None,
        "Kernel table differences repaired at sync",
    ),
    s(
        "conntrack_flushed",
        "gcb_portfwd_conntrack",
        C,
        Some(("result", "flushed")),
        "Conntrack flushes of reused ports, done or skipped",
    ),
    s(
        "conntrack_skipped",
        "gcb_portfwd_conntrack",
        C,
        Some(("result", "skipped")),
        "",
    ),
    s(
        "quarantined",
        "gcb_portfwd_quarantined",
        C,
        None,
        "Mirror records not replayed (policy)",
    ),
    s(
        "mirror_errors",
        "gcb_portfwd_errors",
        C,
        Some(("kind", "mirror")),
        "Mirror file and kernel failures",
    ),
    s(
        "kernel_errors",
        "gcb_portfwd_errors",
        C,
        Some(("kind", "kernel")),
        "",
    ),
    s(
        "datagrams_received",
        "gcb_portfwd_control_datagrams",
        C,
        None,
        "Control datagrams received",
    ),
    s(
        "junk_datagrams",
        "gcb_portfwd_dropped",
        C,
        Some(("reason", "junk_datagram")),
        "Control datagrams dropped, by reason",
    ),
    s(
        "dropped_wrong_interface",
        "gcb_portfwd_dropped",
        C,
        Some(("reason", "wrong_interface")),
        "",
    ),
    s(
        "error_replies",
        "gcb_portfwd_error_replies",
        C,
        None,
        "Error answers sent",
    ),
    s(
        "duplicates",
        "gcb_portfwd_duplicates",
        C,
        None,
        "Retransmitted requests answered from the reply cache",
    ),
];

/// Stats names with no series of their own (`mappings` is split by proto).
pub const NOT_SERIES: &[&str] = &["mappings"];

/// The histogram of rule install latency (seconds): 0.5 ms to 4 s in powers of two.
pub fn install_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// The metrics text of a status document and the install latency histogram.
pub fn render(doc: &Status, install: &Histogram) -> String {
    let mut reg = Registry::default();
    proto_gauge(
        &mut reg,
        "gcb_portfwd_mappings",
        "Forwarding rules installed, by proto",
        doc.mappings.iter().map(|m| m.proto.as_str()),
    );
    register_series(&mut reg, SERIES, &doc.counters);
    reg.register(
        "gcb_portfwd_install_seconds",
        "Time to handle a batch of requests that installs rules (table, mirror fsync, nftables)",
        install.clone(),
    );
    encode_text(&reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_one_kind_and_stats_map_once() {
        gcb_ops::metrics_registry::check_series(SERIES, "gcb_portfwd_").unwrap();
    }
}
