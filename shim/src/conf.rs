//! The shim's and `gcb-run`'s config file: `/etc/gcb/gcb.conf`, or the file `GCB_CONF`
//! names, so an administrator configures a host once.
//!
//! A TOML subset, parsed by hand (the shim keeps its dependencies few): one `key = value`
//! per line, `value` a string (`"..."` with `\"`, `\\`, `\n`, `\t` escapes, or `'...'`
//! literal), an integer (`30000`, `30_000`) or a boolean (`true`/`false`); `#` starts a
//! comment. The keys are the `GCB_*` environment variables in lower case ([`KEYS`]); the
//! environment overrides the file. A line that cannot be used (syntax error, unknown key,
//! wrong type, duplicate) is reported as a [`Problem`] naming its line and key and is
//! ignored: the shim never refuses to run a program over its config file. Pure: the caller
//! reads the file and reports the problems.

/// A value in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Value {
    /// The value as the environment variable of the same key would spell it.
    pub fn as_setting(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => if *b { "1" } else { "0" }.to_owned(),
        }
    }
}

/// What a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
}

/// The keys the file may set, each `GCB_<KEY>` in lower case.
pub const KEYS: &[&str] = &[
    "broker",
    "dpf_server",
    "key_file",
    "log",
    "log_file",
    "heartbeat_ms",
    "standby",
    "punch_tcp",
    "punch_ms",
    "public_names",
    "dpf_refresh_ms",
];

fn kind_of(key: &str) -> Option<Kind> {
    Some(match key {
        "broker" | "dpf_server" | "key_file" | "log" | "log_file" => Kind::Str,
        "heartbeat_ms" | "dpf_refresh_ms" | "punch_ms" => Kind::Int,
        "standby" | "public_names" | "punch_tcp" => Kind::Bool,
        _ => return None,
    })
}

/// A line that was ignored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number.
    pub line: usize,
    /// The key, when the line got that far.
    pub key: Option<String>,
    pub what: String,
}

/// A parsed file: the usable settings, in file order, and the ignored lines.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Conf {
    pub settings: Vec<(String, Value)>,
    pub problems: Vec<Problem>,
}

impl Conf {
    /// The value of `key` (one of [`KEYS`]), if the file set it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.settings.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Parses the text of a config file.
pub fn parse(text: &str) -> Conf {
    let mut conf = Conf::default();
    let mut problems = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let mut problem = |key: Option<&str>, what: String| {
            problems.push(Problem {
                line,
                key: key.map(str::to_owned),
                what,
            })
        };
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        if s.starts_with('[') {
            problem(None, "tables ([...]) are not supported".into());
            continue;
        }
        let Some((key, rest)) = s.split_once('=') else {
            problem(None, "expected key = value".into());
            continue;
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problem(None, format!("{key:?} is not a key"));
            continue;
        }
        let Some(kind) = kind_of(key) else {
            problem(
                Some(key),
                format!("unknown key (known: {})", KEYS.join(", ")),
            );
            continue;
        };
        let value = match parse_value(rest.trim()) {
            Ok(v) => v,
            Err(why) => {
                problem(Some(key), why);
                continue;
            }
        };
        let fits = matches!(
            (kind, &value),
            (Kind::Str, Value::Str(_)) | (Kind::Int, Value::Int(_)) | (Kind::Bool, Value::Bool(_))
        );
        if !fits {
            let want = match kind {
                Kind::Str => "a string (\"...\")",
                Kind::Int => "an integer",
                Kind::Bool => "true or false",
            };
            problem(Some(key), format!("must be {want}"));
            continue;
        }
        if conf.get(key).is_some() {
            problem(Some(key), "duplicate key; the first value is used".into());
            continue;
        }
        conf.settings.push((key.to_owned(), value));
    }
    conf.problems = problems;
    conf
}

/// A value and an optional trailing comment.
fn parse_value(s: &str) -> Result<Value, String> {
    let (value, rest) = if let Some(body) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(e) => return Err(format!("unsupported escape \\{e}")),
                    None => return Err("unterminated string".into()),
                },
                c => out.push(c),
            }
        }
        let end = end.ok_or("unterminated string")?;
        (Value::Str(out), &body[end..])
    } else if let Some(body) = s.strip_prefix('\'') {
        let (lit, rest) = body.split_once('\'').ok_or("unterminated string")?;
        (Value::Str(lit.to_owned()), rest)
    } else {
        let (word, rest) = s.split_once('#').map_or((s, ""), |(w, _)| (w, ""));
        let word = word.trim();
        let v = match word {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "" => return Err("missing value".into()),
            w => {
                let digits = w.strip_prefix(['+', '-']).unwrap_or(w);
                let ok = !digits.is_empty()
                    && !digits.starts_with('_')
                    && !digits.ends_with('_')
                    && !digits.contains("__")
                    && digits.chars().all(|c| c.is_ascii_digit() || c == '_');
                let n = ok
                    .then(|| w.replace('_', "").parse::<i64>().ok())
                    .flatten()
                    .ok_or_else(|| {
                        format!("{w:?} is not a string (quote it), an integer or a boolean")
                    })?;
                Value::Int(n)
            }
        };
        (v, rest)
    };
    let rest = rest.trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(format!("unexpected {rest:?} after the value"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file() {
        let c = parse(
            "# libgcb\n\
             broker = \"203.0.113.10:41203\"  # the pool's broker\n\
             \n\
             key_file = '/etc/gcb/pool.key'\n\
             heartbeat_ms = 5_000\n\
             standby = false\n\
             log = \"warn\"\n",
        );
        assert_eq!(c.problems, vec![]);
        assert_eq!(
            c.get("broker"),
            Some(&Value::Str("203.0.113.10:41203".into()))
        );
        assert_eq!(
            c.get("key_file").map(Value::as_setting).as_deref(),
            Some("/etc/gcb/pool.key")
        );
        assert_eq!(c.get("heartbeat_ms"), Some(&Value::Int(5000)));
        assert_eq!(
            c.get("standby").map(Value::as_setting).as_deref(),
            Some("0")
        );
        assert_eq!(c.get("dpf_server"), None);
    }

    #[test]
    fn escapes() {
        let c = parse(r#"log_file = "/tmp/a \"b\"\\c#d" # x"#);
        assert_eq!(c.problems, vec![]);
        assert_eq!(
            c.get("log_file"),
            Some(&Value::Str("/tmp/a \"b\"\\c#d".into()))
        );
    }

    #[test]
    fn bad_lines_are_named_and_ignored() {
        let c = parse(
            "brokr = \"1.2.3.4\"\n\
             broker = 1.2.3.4\n\
             heartbeat_ms = \"100\"\n\
             [section]\n\
             just words\n\
             log = \"info\" trailing\n\
             log_file = \"open\n\
             standby = true\n\
             standby = false\n",
        );
        let got: Vec<(usize, Option<&str>)> = c
            .problems
            .iter()
            .map(|p| (p.line, p.key.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Some("brokr")),
                (2, Some("broker")),
                (3, Some("heartbeat_ms")),
                (4, None),
                (5, None),
                (6, Some("log")),
                (7, Some("log_file")),
                (9, Some("standby")),
            ]
        );
        assert!(
            c.problems[0].what.contains("unknown key"),
            "{:?}",
            c.problems[0]
        );
        assert_eq!(c.settings, vec![("standby".into(), Value::Bool(true))]);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A deterministic walk over awkward inputs (no proptest in the shim's deps).
        let pieces = [
            "",
            "=",
            "\"",
            "'",
            "\\",
            "#",
            "\n",
            "broker",
            " ",
            "1",
            "_",
            "-",
            "+",
            "true",
            "é",
            "[",
            "]",
            "\u{0}",
            "\r\n",
            "99999999999999999999",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut s = String::new();
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            let _ = parse(&s);
        }
    }
}
