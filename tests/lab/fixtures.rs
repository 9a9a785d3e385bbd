//! Fixtures shared by the lab tests: the build artifacts they run, `gcb-brokerd` started
//! and ready ([`Broker`]), `gcb-portfwd` started and ready on gwa ([`Portfwd`]), programs
//! under `scripts/gcb-run` ([`gcb_run`]), and the small log-reading helpers every test file
//! needs. A test file adds only what is particular to it.

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

/// Whether the daemon `bin` has `flag` (its --help says so): the fixtures also run
/// daemons built before the flag existed.
fn daemon_has_flag(bin: PathBuf, flag: &'static str) -> bool {
    static SEEN: std::sync::Mutex<Vec<(PathBuf, &'static str, bool)>> =
        std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, has)) = seen.iter().find(|(b, f, _)| *b == bin && *f == flag) {
        return *has;
    }
    let out = Command::new(&bin)
        .arg("--help")
        .env_remove("GCB_KEY_FILE")
        .output()
        .unwrap_or_else(|e| panic!("run {} --help: {e}", bin.display()));
    let has = String::from_utf8_lossy(&out.stdout).contains(flag);
    seen.push((bin, flag, has));
    has
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
        let listen = ["--listen", ip];
        Broker::start_with(lab, host, keyed, &[&listen[..], args].concat(), log)
    }

    /// [`Broker::start`] with every address flag in `args` (`--bind`, `--advertise`...):
    /// no `--listen` added.
    pub fn start_with(lab: &Lab, host: Host, keyed: bool, args: &[&str], log: &Path) -> Broker {
        let mut cmd = lab.cmd_keyed(host, keyed, brokerd());
        if !keyed && broker_has_insecure_flag() {
            cmd.args(["--insecure", "--allow", "0.0.0.0/0"]);
        }
        // Its own admin socket next to its log: brokers of parallel tests must not share
        // the default path (a second broker on one path refuses to start).
        if !args.contains(&"--admin-socket") && daemon_has_flag(brokerd(), "--admin-socket") {
            cmd.arg("--admin-socket").arg(log.with_extension("sock"));
        }
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display())));
        let mut proc = lab.spawn(&mut cmd).expect("spawn gcb-brokerd");
        let up = wait_line(log, DAEMON_UP, |l| l.contains("listening on udp")).is_some();
        let exited = proc.wait_timeout(Duration::ZERO).ok().flatten();
        assert!(
            up && exited.is_none(),
            "gcb-brokerd {args:?} did not come up in {host} (exit status {exited:?}):\n{}",
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

    /// The counters of a stats line the broker prints now: SIGUSR1, then the new line
    /// (waiting up to [`DAEMON_UP`]); panics if none comes.
    pub fn stats_now(&self) -> HashMap<String, u64> {
        let count = |t: &str| t.lines().filter(|l| l.contains(" stats ")).count();
        let before = count(&self.text());
        self.proc.signal_group(libc::SIGUSR1);
        let t0 = Instant::now();
        while count(&self.text()) <= before {
            assert!(
                t0.elapsed() < DAEMON_UP,
                "no stats line after SIGUSR1 within {DAEMON_UP:?}; broker log:\n{}",
                self.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
        last_stats(&self.text()).expect("a stats line")
    }

    /// SIGTERMs the broker and returns the counters of the stats line it prints at exit.
    /// A broker still draining relays after 5 s is told again (it then exits at once).
    pub fn stop_and_stats(&mut self) -> HashMap<String, u64> {
        self.proc.signal_group(libc::SIGTERM);
        let mut st = self
            .proc
            .wait_timeout(Duration::from_secs(5))
            .expect("wait broker");
        if st.is_none() {
            self.proc.signal_group(libc::SIGTERM);
            st = self
                .proc
                .wait_timeout(Duration::from_secs(5))
                .expect("wait broker");
        }
        assert!(st.is_some(), "broker did not exit on SIGTERM");
        last_stats(&self.text())
            .unwrap_or_else(|| panic!("no stats line in the broker log:\n{}", self.text()))
    }
}

/// The `NAME=NUMBER` counters of the last stats line (` stats ` in it) of a daemon's log.
pub fn last_stats(log: &str) -> Option<HashMap<String, u64>> {
    let line = log.lines().rev().find(|l| l.contains(" stats "))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
    )
}

/// `gcb-portfwd`, this build's release artifact, which must exist.
pub fn portfwd_bin() -> PathBuf {
    artifact("gcb-portfwd")
}

/// The public address every lab portfwd serves (gwa's WAN address).
pub const PORTFWD_PUBLIC: &str = "203.0.113.1";

/// `gcb-portfwd` on gwa with the arguments every lab portfwd has (`--public 203.0.113.1
/// --probe-timeout-ms 500 --state STATE`) and `args` (`--private`, `--ports`, ...); keyed
/// with the lab's pool key unless `keyed` is false (then nothing else is added: a test of
/// the refusal to start unkeyed runs this as it is).
pub fn portfwd_cmd(lab: &Lab, keyed: bool, state: &Path, args: &[&str]) -> Command {
    let mut cmd = lab.cmd_keyed(Host::Gwa, keyed, portfwd_bin());
    cmd.args(["--public", PORTFWD_PUBLIC, "--probe-timeout-ms", "500"])
        .args(args)
        .arg("--state")
        .arg(state);
    // Its own admin socket next to its state (see Broker::start).
    if !args.contains(&"--admin-socket") && daemon_has_flag(portfwd_bin(), "--admin-socket") {
        cmd.arg("--admin-socket").arg(state.with_extension("sock"));
    }
    cmd
}

/// A running `gcb-portfwd` on gwa: its state in `DIR/state` (a test's [`Scratch`], so it
/// is kept with the logs when the test fails), its stdout and stderr in `DIR/portfwd-N.log`
/// (N counts the starts in DIR). Keyed with the lab's pool key unless started with
/// [`Portfwd::start_insecure`]. Killed with its process group when dropped.
#[derive(Debug)]
pub struct Portfwd {
    /// The daemon.
    pub proc: Proc,
    /// The log of this start (stdout and stderr).
    pub log: PathBuf,
    /// Its state directory (the mirror is `state/mirror`).
    pub state: PathBuf,
    dir: PathBuf,
    keyed: bool,
    args: Vec<String>,
}

impl Portfwd {
    /// Starts portfwd keyed with the lab's pool key (see [`portfwd_cmd`] for the arguments
    /// it always has), and waits until it is ready: it says `listening on udp ADDR`, is
    /// still running, and ADDR's port is bound in gwa. Panics with its log otherwise.
    pub fn start(lab: &Lab, dir: &Path, args: &[&str]) -> Portfwd {
        Portfwd::spawn(lab, dir, true, args)
    }

    /// [`Portfwd::start`] without the pool key, with `--insecure` (a LAN-trusting
    /// deployment).
    pub fn start_insecure(lab: &Lab, dir: &Path, args: &[&str]) -> Portfwd {
        Portfwd::spawn(lab, dir, false, args)
    }

    fn spawn(lab: &Lab, dir: &Path, keyed: bool, args: &[&str]) -> Portfwd {
        let state = dir.join("state");
        let log = (1..)
            .map(|n| dir.join(format!("portfwd-{n}.log")))
            .find(|p| !p.exists())
            .expect("a free log name");
        let file = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut cmd = portfwd_cmd(lab, keyed, &state, args);
        if !keyed {
            cmd.arg("--insecure");
        }
        cmd.stdout(file.try_clone().expect("dup log file"))
            .stderr(file);
        let proc = lab.spawn(&mut cmd).expect("spawn gcb-portfwd");
        let mut pf = Portfwd {
            proc,
            log,
            state,
            dir: dir.to_owned(),
            keyed,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        pf.wait_ready(lab);
        pf
    }

    fn wait_ready(&mut self, lab: &Lab) {
        const READY: &str = "listening on udp ";
        let line = wait_line(&self.log, DAEMON_UP, |l| l.contains(READY));
        let exited = self.proc.wait_timeout(Duration::ZERO).ok().flatten();
        let Some(line) = line.filter(|_| exited.is_none()) else {
            panic!(
                "gcb-portfwd did not come up (exit status {exited:?}); {}:\n{}",
                self.log.display(),
                self.text()
            )
        };
        let port = parse_after(&line, READY).port();
        lab.wait_for_udp_bind(Host::Gwa, port, DAEMON_UP)
            .unwrap_or_else(|e| panic!("gcb-portfwd said {line:?}, but: {e}"));
    }

    /// The log of this start so far.
    pub fn text(&self) -> String {
        read_text(&self.log)
    }

    /// kill -9 (the whole group); returns once it is reaped.
    pub fn crash(&mut self) {
        self.proc.signal_group(libc::SIGKILL);
        let st = self.proc.wait_timeout(DAEMON_UP).expect("wait portfwd");
        assert!(st.is_some(), "gcb-portfwd outlived SIGKILL");
    }

    /// SIGTERM; waits until it exits and returns the counters of the stats line it prints
    /// on the way out (panics without one).
    pub fn stop_and_stats(&mut self) -> HashMap<String, u64> {
        self.proc.signal_group(libc::SIGTERM);
        let st = self.proc.wait_timeout(DAEMON_UP).expect("wait portfwd");
        assert!(st.is_some(), "gcb-portfwd did not exit on SIGTERM");
        last_stats(&self.text())
            .unwrap_or_else(|| panic!("no stats line in the portfwd log:\n{}", self.text()))
    }

    /// The counter `name` of the last stats line so far, waiting up to `timeout` for one.
    pub fn stat(&self, name: &str, timeout: Duration) -> u64 {
        wait_line_containing(&self.log, " stats ", timeout);
        let stats = last_stats(&self.text()).expect("a stats line");
        *stats
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in the stats line:\n{}", self.text()))
    }

    /// Starts it again with the same state directory, key mode and arguments, after
    /// whatever ended the previous process ([`Portfwd::crash`], [`Portfwd::stop_and_stats`];
    /// one still running is killed first). The new start logs to a new file.
    pub fn restart(&mut self, lab: &Lab) {
        let args = self.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.restart_with(lab, &args);
    }

    /// [`Portfwd::restart`] with other arguments (a changed policy).
    pub fn restart_with(&mut self, lab: &Lab, args: &[&str]) {
        let _ = self.proc.kill();
        *self = Portfwd::spawn(lab, &self.dir, self.keyed, args);
    }
}

/// portfwd's two dnat maps on gwa (`fwd_tcp`, then `fwd_udp`), as `nft list map` prints
/// them; panics if nft fails.
pub fn portfwd_maps(lab: &Lab) -> String {
    let out = lab.sh(
        Host::Gwa,
        "nft list map ip gcb_portfwd fwd_tcp && nft list map ip gcb_portfwd fwd_udp",
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "nft list map: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
