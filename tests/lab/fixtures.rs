//! Fixtures shared by the lab tests: the build artifacts they run, `gcb-brokerd` started
//! and ready, programs under `scripts/gcb-run`, and the small log-reading helpers every
//! test file needs. A test file adds only what is particular to it.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::{artifact, read_text, repo_root, wait_line, Host, Lab, Proc};

/// How long a daemon gets to come up.
pub const DAEMON_UP: Duration = Duration::from_secs(10);

/// The broker daemon: `$GCB_TEST_BROKERD` if set (to run a test against another build,
/// e.g. the code before a fix), else this build's release artifact, which must exist.
pub fn brokerd() -> PathBuf {
    match std::env::var_os("GCB_TEST_BROKERD") {
        Some(p) => PathBuf::from(p),
        None => artifact("gcb-brokerd"),
    }
}

/// The shim (a release artifact that must exist).
pub fn libgcb() -> PathBuf {
    artifact("libgcb.so")
}

/// `scripts/gcb-run`, which must exist.
pub fn gcb_run_script() -> PathBuf {
    let p = repo_root().join("scripts/gcb-run");
    assert!(p.exists(), "missing {}", p.display());
    p
}

/// The real python3 executable (not a pyenv shim script: preloading a shell script
/// would put the shim in the shell too), resolved once; panics if there is none.
pub fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed (scripts/install-deps)");
        assert!(out.status.success(), "python3 failed: {out:?}");
        let exe = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!exe.is_empty(), "python3 reports no sys.executable");
        exe
    })
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// The `IP:PORT` right after the first `marker` in a log line (a trailing `,` or `)` is
/// not part of it); panics if there is none.
pub fn parse_after(line: &str, marker: &str) -> SocketAddrV4 {
    let rest = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in {line:?}"))
        .1;
    let word = rest.split_whitespace().next().unwrap_or("");
    word.trim_end_matches([',', ')'])
        .parse()
        .unwrap_or_else(|e| panic!("bad address {word:?} in {line:?}: {e}"))
}

/// The first line of `path` containing `needle`, waiting up to `timeout`; panics with the
/// file's text if none comes.
pub fn wait_line_containing(path: &Path, needle: &str, timeout: Duration) -> String {
    wait_line(path, timeout, |l| l.contains(needle)).unwrap_or_else(|| {
        panic!(
            "no line with {needle:?} in {} within {timeout:?}; it has:\n{}",
            path.display(),
            read_text(path)
        )
    })
}

/// Polls `f` every 100 ms until it is true; panics after `timeout`. Returns how long it
/// took.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

/// Whether this gcb-brokerd has `--insecure` (brokers before issue #10 had no such flag
/// and ran unkeyed when given no key), so the security tests also run against them.
fn broker_has_insecure_flag() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let out = Command::new(brokerd())
            .arg("--help")
            .env_remove("GCB_KEY_FILE")
            .output()
            .expect("run gcb-brokerd --help");
        String::from_utf8_lossy(&out.stdout).contains("--insecure")
    })
}

/// A running `gcb-brokerd`, its stderr (the log) in a file. Killed with its process group
/// when dropped.
#[derive(Debug)]
pub struct Broker {
    /// The daemon.
    pub proc: Proc,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Broker {
    /// Starts `gcb-brokerd --listen IP ARGS...` in `host`, logging to `log`, and waits
    /// until it says it listens (udp and relay tcp bound) and is still running; panics
    /// with its log otherwise. `keyed` false: without the lab's pool key and, when the
    /// broker has the flag, `--insecure --allow 0.0.0.0/0` (open to every source).
    pub fn start(
        lab: &Lab,
        host: Host,
        ip: &str,
        keyed: bool,
        args: &[&str],
        log: &Path,
    ) -> Broker {
        let mut cmd = lab.cmd_keyed(host, keyed, brokerd());
        cmd.args(["--listen", ip]);
        if !keyed && broker_has_insecure_flag() {
            cmd.args(["--insecure", "--allow", "0.0.0.0/0"]);
        }
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display())));
        let mut proc = lab.spawn(&mut cmd).expect("spawn gcb-brokerd");
        let up = wait_line(log, DAEMON_UP, |l| l.contains("listening on udp")).is_some();
        let exited = proc.wait_timeout(Duration::ZERO).ok().flatten();
        assert!(
            up && exited.is_none(),
            "gcb-brokerd did not come up on {ip} in {host} (exit status {exited:?}):\n{}",
            read_text(log)
        );
        Broker {
            proc,
            log: log.to_owned(),
        }
    }

    /// The log so far.
    pub fn text(&self) -> String {
        read_text(&self.log)
    }

    /// The proxy the broker assigned to the `what` (`"tcp listener"`, `"udp socket"`)
    /// registered with local address `local`, waiting up to `timeout` for it.
    pub fn proxy_of(&self, what: &str, local: &str, timeout: Duration) -> SocketAddrV4 {
        let needle = format!("registered {what} local {local} ");
        let line = wait_line(&self.log, timeout, |l| l.contains(&needle)).unwrap_or_else(|| {
            panic!(
                "no registration of {what} {local}; broker log:\n{}",
                self.text()
            )
        });
        parse_after(&line, "-> proxy ")
    }

    /// SIGTERMs the broker and returns the counters of the stats line it prints at exit.
    pub fn stop_and_stats(&mut self) -> HashMap<String, u64> {
        self.proc.signal_group(libc::SIGTERM);
        let st = self
            .proc
            .wait_timeout(Duration::from_secs(5))
            .expect("wait broker");
        assert!(st.is_some(), "broker did not exit on SIGTERM");
        let log = self.text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(" stats "))
            .unwrap_or_else(|| panic!("no stats line in the broker log:\n{log}"));
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }
}

/// `scripts/gcb-run OPTS... [--log LEVEL --log-file LOG] --` in `host` with `GCB_LIB` set to
/// this build's shim, keyed with the lab's pool key unless `keyed` is false: add the
/// program and its arguments.
pub fn gcb_run(
    lab: &Lab,
    host: Host,
    keyed: bool,
    opts: &[&str],
    log: Option<(&str, &Path)>,
) -> Command {
    let mut c = lab.cmd_keyed(host, keyed, gcb_run_script());
    c.env("GCB_LIB", libgcb()).args(opts);
    if let Some((level, file)) = log {
        c.args(["--log", level, "--log-file"]).arg(file);
    }
    c.arg("--");
    c
}
