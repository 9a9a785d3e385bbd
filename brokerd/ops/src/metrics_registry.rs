//! The daemons' metrics as Prometheus series, encoded with the `prometheus-client` crate
//! (OpenMetrics text): each daemon lists its stats counters' series in a table of
//! [`Series`] (its `metrics` module), and [`register_series`] turns the table and the
//! counter values into families of a [`Registry`]; [`proto_gauge`] adds the per-proto
//! count of a list and [`encode_text`] writes the whole registry.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// A [`Series`] (short, for the daemons' tables).
pub const fn series(
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

type Labels = Vec<(String, String)>;

/// Registers the gauge family `name`, one series per proto (`proto="tcp|udp"`) counting
/// the items of `protos` that are that proto.
pub fn proto_gauge<'a>(
    reg: &mut Registry,
    name: &str,
    help: &str,
    protos: impl Iterator<Item = &'a str> + Clone,
) {
    let family: Family<Labels, Gauge> = Family::default();
    for proto in ["tcp", "udp"] {
        let n = protos.clone().filter(|p| *p == proto).count();
        family
            .get_or_create(&vec![("proto".into(), proto.into())])
            .set(n as i64);
    }
    reg.register(name, help, family);
}

/// Registers `series` with their values in `counters` (the status document's: stats name
/// -> number; a missing value: not shown).
pub fn register_series(
    reg: &mut Registry,
    series: &[Series],
    counters: &serde_json::Map<String, serde_json::Value>,
) {
    let value = |stat: &str| counters.get(stat).and_then(|v| v.as_u64());
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

/// The registry as OpenMetrics text.
pub fn encode_text(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, reg);
    out
}

/// Checks a daemon's table: every metric starts with `prefix` and has no `_total`, a
/// family's series are all one kind, and each stats name has one series. The problem
/// found, if any (for the daemons' unit tests).
pub fn check_series(series: &[Series], prefix: &str) -> Result<(), String> {
    for x in series {
        if !x.metric.starts_with(prefix) || x.metric.ends_with("_total") {
            return Err(format!("{}: not {prefix}NAME without _total", x.metric));
        }
        if series
            .iter()
            .any(|y| y.metric == x.metric && y.kind != x.kind)
        {
            return Err(format!("{}: a family of two kinds", x.metric));
        }
        if series.iter().filter(|y| y.stat == x.stat).count() != 1 {
            return Err(format!("{}: more than one series", x.stat));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[Series] = &[
        series("a", "gcb_x_a", Kind::Gauge, None, "A"),
        series("b1", "gcb_x_b", Kind::Counter, Some(("k", "one")), "B"),
        series("b2", "gcb_x_b", Kind::Counter, Some(("k", "two")), ""),
    ];

    #[test]
    fn families_render_with_the_first_help_and_skip_missing_values() {
        let mut reg = Registry::default();
        proto_gauge(
            &mut reg,
            "gcb_x_regs",
            "Regs",
            ["tcp", "udp", "tcp"].into_iter(),
        );
        let counters = serde_json::json!({"a": 3, "b1": 3, "other": 1});
        register_series(&mut reg, TABLE, counters.as_object().unwrap());
        let text = encode_text(&reg);
        assert!(text.contains("gcb_x_regs{proto=\"tcp\"} 2\n"), "{text}");
        assert!(text.contains("gcb_x_regs{proto=\"udp\"} 1\n"), "{text}");
        assert!(
            text.contains("# HELP gcb_x_a A.\n# TYPE gcb_x_a gauge\ngcb_x_a 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP gcb_x_b B.\n# TYPE gcb_x_b counter\n"),
            "{text}"
        );
        assert!(text.contains("gcb_x_b_total{k=\"one\"} 3\n"), "{text}");
        assert!(!text.contains("two"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn check_series_finds_what_is_wrong() {
        assert_eq!(check_series(TABLE, "gcb_x_"), Ok(()));
        assert!(check_series(TABLE, "gcb_y_").is_err());
        let two_kinds = [
            series("a", "gcb_x_a", Kind::Gauge, None, ""),
            series("b", "gcb_x_a", Kind::Counter, None, ""),
        ];
        assert!(check_series(&two_kinds, "gcb_x_").is_err());
        let twice = [
            series("a", "gcb_x_a", Kind::Gauge, None, ""),
            series("a", "gcb_x_b", Kind::Gauge, None, ""),
        ];
        assert!(check_series(&twice, "gcb_x_").is_err());
    }
}
