//! Plain-socket example programs; see `src/bin`.
//!
//! The programs know nothing about GCB: they use std sockets the way an unmodified legacy
//! grid program uses libc sockets, and advertise whatever `getsockname()` says. This
//! library holds the few helpers they share.

use std::fmt::Display;
use std::io::{self, BufRead, Read, Write};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The version every example prints for `--version`: the package's and the git commit.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GCB_GIT_COMMIT"), ")");

/// The positional arguments of a program without clap (the benchmarks' small tools):
/// `-h`/`--help` prints `usage` on stdout and exits 0, `-V`/`--version` prints the
/// version and exits 0, another `-...` argument or more than `max` arguments is a usage
/// error (status 2): a typo never becomes an address to connect to or a benchmark.
pub fn positional_args(program: &str, usage: &str, max: usize) -> Vec<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for a in &args {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0)
            }
            "-V" | "--version" => {
                println!("{program} {VERSION}");
                std::process::exit(0)
            }
            s if s.starts_with('-') && s.parse::<f64>().is_err() => {
                eprintln!("{program}: error: unknown option {s}\n{usage}");
                std::process::exit(2)
            }
            _ => {}
        }
    }
    if args.len() > max {
        eprintln!("{program}: error: too many arguments\n{usage}");
        std::process::exit(2)
    }
    args
}

/// The `i`th positional argument as a number, `default` if absent; a usage error (status
/// 2) if it is not one.
pub fn number_arg<T: std::str::FromStr>(program: &str, args: &[String], i: usize, default: T) -> T {
    match args.get(i) {
        None => default,
        Some(a) => a.parse().unwrap_or_else(|_| {
            eprintln!("{program}: error: {a:?} is not a number (see --help)");
            std::process::exit(2)
        }),
    }
}

/// Prints `PROGRAM: error: MSG` to stderr and exits with status 1.
pub fn die(program: &str, msg: impl Display) -> ! {
    eprintln!("{program}: error: {msg}");
    std::process::exit(1)
}

/// Prints `line` on stdout and flushes it (a test harness reads it through a pipe); exits
/// via [`die`] if stdout is gone.
pub fn say(program: &str, line: impl Display) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        die(program, "cannot write to stdout");
    }
}

/// `n` random bytes from `/dev/urandom`.
pub fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The median of `v` (sorts it); 0 for an empty slice.
pub fn median(v: &mut [u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// Reads one `\n`-terminated line of at most `max` bytes (without the newline). An EOF
/// before any byte is `UnexpectedEof`; a longer line is `InvalidData`.
pub fn read_line(r: &mut impl BufRead, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.take(max as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if line.last() != Some(&b'\n') {
        let why = if line.len() > max {
            "line too long"
        } else {
            "line not terminated"
        };
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    line.pop();
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Parses a number of seconds (fractions allowed) for clap.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_line_limits() {
        let mut r = io::Cursor::new(b"QUERY\nrest".to_vec());
        assert_eq!(read_line(&mut r, 16).unwrap(), "QUERY");
        assert_eq!(
            read_line(&mut r, 16).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut r = io::Cursor::new(b"0123456789\n".to_vec());
        assert_eq!(
            read_line(&mut r, 4).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut r = io::Cursor::new(Vec::new());
        assert_eq!(
            read_line(&mut r, 4).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn sha_and_median() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(median(&mut [5, 1, 3]), 3);
        assert_eq!(median(&mut []), 0);
    }
}
