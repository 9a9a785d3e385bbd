//! The Prometheus endpoint's text (`--metrics ADDR`, `GET /metrics`; served by
//! [`crate::ops`]), encoded with the `prometheus-client` crate (OpenMetrics text).
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

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::status::Status;

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (the encoder adds `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One series: the stats name it comes from, the metric (without `_total`), its kind, a
/// label, and the family's help (the first row of a family gives it).
pub struct Series {
    /// The stats line's name.
    pub stat: &'static str,
    /// The metric family's name, without `_total`.
    pub metric: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// The series' label, if any.
    pub label: Option<(&'static str, &'static str)>,
    /// The family's help text.
    pub help: &'static str,
}

const fn s(
    stat: &'static str,
    metric: &'static str,
    kind: Kind,
    label: Option<(&'static str, &'static str)>,
    help: &'static str,
) -> Series {
    Series {
        stat,
        metric,
        kind,
        label,
        help,
    }
}

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

type Labels = Vec<(String, String)>;

/// The metrics text of a status document and the install latency histogram.
pub fn render(doc: &Status, install: &Histogram) -> String {
    let mut reg = Registry::default();
    let maps: Family<Labels, Gauge> = Family::default();
    for proto in ["tcp", "udp"] {
        let n = doc.mappings.iter().filter(|m| m.proto == proto).count();
        maps.get_or_create(&vec![("proto".into(), proto.into())])
            .set(n as i64);
    }
    reg.register(
        "gcb_portfwd_mappings",
        "Forwarding rules installed, by proto",
        maps,
    );
    register_series(&mut reg, SERIES, |stat| {
        doc.counters.get(stat).and_then(|v| v.as_u64())
    });
    reg.register(
        "gcb_portfwd_install_seconds",
        "Time to handle a batch of requests that installs rules (table, mirror fsync, nftables)",
        install.clone(),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Registers `series` with the values `value` gives (a missing value: not shown).
pub fn register_series(reg: &mut Registry, series: &[Series], value: impl Fn(&str) -> Option<u64>) {
    let mut names: Vec<&str> = Vec::new();
    for x in series {
        if !names.contains(&x.metric) {
            names.push(x.metric);
        }
    }
    for name in names {
        let rows: Vec<&Series> = series.iter().filter(|x| x.metric == name).collect();
        let help = rows
            .iter()
            .map(|x| x.help)
            .find(|h| !h.is_empty())
            .unwrap_or("");
        let labels = |x: &Series| -> Labels {
            x.label
                .map(|(k, v)| vec![(k.to_owned(), v.to_owned())])
                .unwrap_or_default()
        };
        match rows[0].kind {
            Kind::Counter => {
                let f: Family<Labels, Counter> = Family::default();
                for x in &rows {
                    if let Some(v) = value(x.stat) {
                        f.get_or_create(&labels(x)).inc_by(v);
                    }
                }
                reg.register(name, help, f);
            }
            Kind::Gauge => {
                let f: Family<Labels, Gauge> = Family::default();
                for x in &rows {
                    if let Some(v) = value(x.stat) {
                        f.get_or_create(&labels(x)).set(v as i64);
                    }
                }
                reg.register(name, help, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_one_kind_and_stats_map_once() {
        for x in SERIES {
            assert!(x.metric.starts_with("gcb_portfwd_"), "{}", x.metric);
            assert!(!x.metric.ends_with("_total"), "{}", x.metric);
            let same: Vec<&Series> = SERIES.iter().filter(|y| y.metric == x.metric).collect();
            assert!(same.iter().all(|y| y.kind == x.kind), "{}", x.metric);
            assert_eq!(
                SERIES.iter().filter(|y| y.stat == x.stat).count(),
                1,
                "{}",
                x.stat
            );
        }
    }
}
