//! Helpers of the daemons' human-readable status (`gcb-DAEMON status` without `--json`):
//! durations, column-aligned tables and the counters block, so both daemons print alike.

/// A duration in seconds as `59s`, `12m05s` (from 2 minutes) or `3h07m` (from 2 hours).
pub fn secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

/// A table's header row.
pub fn header(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Appends `TITLE (N)` and the rows as columns (the first row is the header, N the
/// rows below it; none: the title alone), then a blank line.
pub fn push_table(out: &mut String, title: &str, rows: Vec<Vec<String>>) {
    out.push_str(&format!("{title} ({})\n", rows.len().saturating_sub(1)));
    if rows.len() <= 1 {
        out.push('\n');
        return;
    }
    let n = rows[0].len();
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str("  ");
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push('\n');
}

/// Appends the `Counters` block: one `NAME VALUE` line each.
pub fn push_counters(out: &mut String, counters: &serde_json::Map<String, serde_json::Value>) {
    out.push_str("Counters\n");
    for (k, v) in counters {
        out.push_str(&format!("  {k:<28} {v}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(secs(-1.0), "0s");
        assert_eq!(secs(119.9), "119s");
        assert_eq!(secs(125.0), "2m05s");
        assert_eq!(secs(7300.0), "2h01m");
    }

    #[test]
    fn tables_align_columns_and_trim_the_last() {
        let mut out = String::new();
        push_table(&mut out, "Empty", vec![header(&["A", "B"])]);
        let rows = vec![
            header(&["A", "LONG B"]),
            vec!["xxxx".to_owned(), "y".to_owned()],
        ];
        push_table(&mut out, "Two", rows);
        assert_eq!(out, "Empty (0)\n\nTwo (1)\n  A     LONG B\n  xxxx  y\n\n");
    }
}
