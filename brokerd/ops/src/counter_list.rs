//! A daemon's counter list: its counters and gauges as `(name, value)` pairs in the stats
//! line's order, the one source of the stats log line ([`stats_line`]), the status
//! document's `counters` ([`counters_json`]) and so the metrics.

/// The stats log line's `NAME=VALUE` pairs, space-separated.
pub fn stats_line(counters: &[(&str, u64)]) -> String {
    let pairs: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(" ")
}

/// The status document's `counters`: the same pairs as a JSON object (sorted by name).
pub fn counters_json(counters: Vec<(&str, u64)>) -> serde_json::Map<String, serde_json::Value> {
    counters
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_keeps_the_order_and_json_has_every_pair() {
        let list = vec![("relays", 2), ("bytes", 10)];
        assert_eq!(stats_line(&list), "relays=2 bytes=10");
        let json = counters_json(list);
        assert_eq!(
            serde_json::Value::Object(json).to_string(),
            r#"{"bytes":10,"relays":2}"#
        );
        assert_eq!(stats_line(&[]), "");
    }
}
