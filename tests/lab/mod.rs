//! The libgcb network lab: real Linux NAT in network namespaces, for integration tests.
//!
//! Every [`Lab`] is a fresh set of namespaces built by `scripts/netlab up NAME` and removed
//! by `scripts/netlab down NAME` when the `Lab` is dropped (also when the test panics):
//!
//! ```text
//!   a1 10.1.0.11 ─┐                                       ┌─ p1 203.0.113.10
//!   a2 10.1.0.12 ─┼─ [lana] ─ gwa 10.1.0.1 | 203.0.113.1 ─┤
//!                                                          ├─ [pub] 203.0.113.0/24
//!   b1 10.2.0.11 ─── [lanb] ─ gwb 10.2.0.1 | 203.0.113.2 ─┤
//!                                                          └─ p2 203.0.113.11
//! ```
//!
//! * Each host is a namespace `NAME-HOST` (see [`Lab::ns`]); the LANs and the public segment
//!   are bridges in namespaces of their own, so a lab puts nothing in the root namespace and
//!   any number of labs run side by side (tests run in parallel).
//! * The gateways `gwa`/`gwb` masquerade their private subnet going out to the public
//!   segment and drop unsolicited inbound traffic (nftables table `inet netlab`, forward
//!   chain `policy drop; ct state established,related accept; ct status dnat accept;` plus
//!   new private->public). A dnat rule put on a gateway by someone else (DPF's portfwd, in
//!   its own table) is let through by `ct status dnat accept`.
//! * Private hosts default-route via their gateway; public hosts have no route to 10.x.
//!   So without GCB/DPF: a1 -> p1 works (p1 sees 203.0.113.1), p1 -> a1 fails, a1 -> b1
//!   fails, a1 -> a2 works.
//! * [`Lab::nat1to1`] (opt-in) adds c1 10.3.0.11 behind gwc, which maps 203.0.113.20
//!   1:1 to it ([`NAT1TO1_PUBLIC`]): a cloud VM whose public IP no interface holds; c1
//!   is also the NAT gateway of d1 10.4.0.11 (a cloud "NAT instance").
//! * [`Lab::loss`] drops a random percentage of a gateway's forwarded packets (both
//!   directions), with nftables `numgen random` (the kernel here has no netem).
//! * [`Lab::cpe`] makes both gateways drop (not answer) unsolicited UDP and TCP addressed
//!   to themselves, as home routers do and hole punching needs; [`Lab::nat`] makes a
//!   gateway's masquerade hard (a random port per connection); [`Lab::synblock`] makes it
//!   drop inbound SYNs.
//!
//! Typical GCB/DPF test: brokerd on p1 (or a gateway), portfwd on gwa, a server in a1 under
//! `gcb-run`, a client in p2 or b1:
//!
//! ```no_run
//! use gcb_lab::{Host, Lab};
//! use std::time::Duration;
//!
//! let lab = Lab::up();
//! let broker = lab
//!     .spawn(lab.cmd(Host::P1, gcb_lab::release_artifact("gcb-brokerd")).arg("--listen=203.0.113.10:7000"))
//!     .unwrap();
//! lab.wait_for_udp_bind(Host::P1, 7000, Duration::from_secs(5)).unwrap();
//! let out = lab.run(Host::A1, "ncat", ["-w", "1", "-z", "203.0.113.10", "22"], Duration::from_secs(3));
//! assert!(!out.status.success());
//! drop(broker); // kills the broker's whole process group
//! ```
//!
//! Shared fixtures (module `fixtures`, re-exported here): [`Broker`] (started, ready, its
//! log), [`Portfwd`] (on gwa, started, ready, its state and logs in the test's scratch dir,
//! crash/restart/stop), [`gcb_run`] (a program under `scripts/gcb-run` with this build's
//! shim, for GCB with `--broker` and DPF with `--dpf`), [`python`],
//! the build artifacts, and log helpers; [`Scratch`] keeps a failed test's logs. The test
//! programs are files under `tests/programs/`, compiled into the tests with `include_str!`.
//!
//! Lab tests need root. [`require_root`] (called by [`Lab::up`]) panics without it: a lab
//! test never skips silently. Tools used: `ip`, `nft`, `ss`, plus whatever the test runs
//! (`scripts/install-deps` installs ncat, socat, iperf3, curl, python3, ...).

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

mod fixtures;
pub use fixtures::*;

/// The private subnet behind gwa.
pub const NET_A: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 1, 0, 0), 24);
/// The private subnet behind gwb.
pub const NET_B: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 2, 0, 0), 24);
/// The public segment.
pub const NET_PUB: (Ipv4Addr, u8) = (Ipv4Addr::new(203, 0, 113, 0), 24);

/// A host of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// Private host behind gwa, 10.1.0.11.
    A1,
    /// Private host behind gwa, 10.1.0.12.
    A2,
    /// NAT gateway of 10.1.0.0/24: 10.1.0.1 inside, 203.0.113.1 outside.
    Gwa,
    /// Private host behind gwb, 10.2.0.11.
    B1,
    /// NAT gateway of 10.2.0.0/24: 10.2.0.1 inside, 203.0.113.2 outside.
    Gwb,
    /// Public host, 203.0.113.10.
    P1,
    /// Public host, 203.0.113.11.
    P2,
    /// Only after [`Lab::nat1to1`]: a host at 10.3.0.11 behind gwc, reachable from
    /// and seen on the public segment as [`NAT1TO1_PUBLIC`] (1:1 NAT, as a cloud VM's
    /// public IP); no interface of c1 holds that IP. Also the NAT gateway of d1
    /// (10.4.0.1 inside).
    C1,
    /// Only after [`Lab::nat1to1`]: the 1:1 NAT gateway of c1, 10.3.0.1 inside,
    /// 203.0.113.3 outside (it also answers ARP for [`NAT1TO1_PUBLIC`]).
    Gwc,
    /// Only after [`Lab::nat1to1`]: a private host at 10.4.0.11 behind c1 (seen on the
    /// public segment as [`NAT1TO1_PUBLIC`]).
    D1,
}

/// The public IP gwc maps 1:1 to c1 ([`Lab::nat1to1`]).
pub const NAT1TO1_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

impl Host {
    /// Every host of the default lab, in a fixed order (c1 and gwc are opt-in).
    pub const ALL: [Host; 7] = [
        Host::A1,
        Host::A2,
        Host::Gwa,
        Host::B1,
        Host::Gwb,
        Host::P1,
        Host::P2,
    ];

    /// The short name used by `scripts/netlab` (`"a1"`, `"gwa"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Host::A1 => "a1",
            Host::A2 => "a2",
            Host::Gwa => "gwa",
            Host::B1 => "b1",
            Host::Gwb => "gwb",
            Host::P1 => "p1",
            Host::P2 => "p2",
            Host::C1 => "c1",
            Host::Gwc => "gwc",
            Host::D1 => "d1",
        }
    }

    /// The host's own address: the private address of a1/a2/b1, the public address of
    /// p1/p2, and the public (wan) address of a gateway (see [`Host::lan_addr`]).
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Host::A1 => Ipv4Addr::new(10, 1, 0, 11),
            Host::A2 => Ipv4Addr::new(10, 1, 0, 12),
            Host::Gwa => Ipv4Addr::new(203, 0, 113, 1),
            Host::B1 => Ipv4Addr::new(10, 2, 0, 11),
            Host::Gwb => Ipv4Addr::new(203, 0, 113, 2),
            Host::P1 => Ipv4Addr::new(203, 0, 113, 10),
            Host::P2 => Ipv4Addr::new(203, 0, 113, 11),
            Host::C1 => Ipv4Addr::new(10, 3, 0, 11),
            Host::Gwc => Ipv4Addr::new(203, 0, 113, 3),
            Host::D1 => Ipv4Addr::new(10, 4, 0, 11),
        }
    }

    /// A gateway's private (lan) address; `None` for other hosts.
    pub fn lan_addr(self) -> Option<Ipv4Addr> {
        match self {
            Host::Gwa => Some(Ipv4Addr::new(10, 1, 0, 1)),
            Host::Gwb => Some(Ipv4Addr::new(10, 2, 0, 1)),
            Host::Gwc => Some(Ipv4Addr::new(10, 3, 0, 1)),
            Host::C1 => Some(Ipv4Addr::new(10, 4, 0, 1)),
            _ => None,
        }
    }

    /// The address this host's outbound traffic has on the public segment: its gateway's
    /// public address for a private host (masquerade), c1's 1:1 address, its own address
    /// otherwise.
    pub fn public_addr(self) -> Ipv4Addr {
        if matches!(self, Host::C1 | Host::D1) {
            return NAT1TO1_PUBLIC;
        }
        match self.gateway() {
            Some(gw) => gw.addr(),
            None => self.addr(),
        }
    }

    /// The NAT gateway in front of a private host; `None` for gateways and public hosts.
    pub fn gateway(self) -> Option<Host> {
        match self {
            Host::A1 | Host::A2 => Some(Host::Gwa),
            Host::B1 => Some(Host::Gwb),
            Host::C1 => Some(Host::Gwc),
            Host::D1 => Some(Host::C1),
            _ => None,
        }
    }

    /// True for a1, a2, b1, c1, d1 (hosts behind a NAT).
    pub fn is_private(self) -> bool {
        self.gateway().is_some()
    }

    /// True for gwa, gwb (the gateways of the default lab, which [`Lab::loss`] can
    /// make lossy).
    pub fn is_gateway(self) -> bool {
        matches!(self, Host::Gwa | Host::Gwb)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Panics unless running as root. Lab tests must never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this test needs root: it builds a network lab with network namespaces and \
             nftables (euid is {euid}). Run the tests as root, e.g. `sudo -E cargo test -p gcb-lab`."
        );
    }
}

/// The repository root (where `scripts/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cargo target directory: `$CARGO_TARGET_DIR` if set (relative to the repo root), else
/// the directory the running test binary was built in, else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            repo_root().join(dir)
        };
    }
    // A test binary is <target>/<profile>/deps/<name>-<hash>.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent().filter(|d| d.ends_with("deps")) {
            if let Some(target) = deps.parent().and_then(|p| p.parent()) {
                return target.to_path_buf();
            }
        }
    }
    repo_root().join("target")
}

/// Path of a release build artifact, e.g. `release_artifact("libgcb.so")` or
/// `release_artifact("brokerd")`: the first that exists of `release/NAME` under
/// [`target_dir`], the test binary's own target directory and `<repo>/target`; if none
/// exists, the path under [`target_dir`]. Does not build anything.
pub fn release_artifact(name: &str) -> PathBuf {
    let mut dirs = vec![target_dir()];
    if let Some(t) = std::env::current_exe().ok().and_then(|exe| {
        exe.parent()
            .and_then(|d| d.parent())
            .and_then(|d| d.parent())
            .map(PathBuf::from)
    }) {
        dirs.push(t);
    }
    dirs.push(repo_root().join("target"));
    let candidates: Vec<PathBuf> = dirs.iter().map(|d| d.join("release").join(name)).collect();
    candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or(&candidates[0])
        .clone()
}

/// [`release_artifact`] that must exist: panics with the command that builds it (a lab
/// test builds nothing itself).
pub fn artifact(name: &str) -> PathBuf {
    let p = release_artifact(name);
    assert!(
        p.exists(),
        "missing build artifact {name} ({}): run `cargo build --release --workspace` first \
         (scripts/test-all does)",
        p.display()
    );
    p
}

/// A file's text (lossy UTF-8); empty if it cannot be read (yet).
pub fn read_text(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Polls the file at `path` until one of its lines satisfies `pred`, for at most
/// `timeout`; returns that line.
pub fn wait_line(
    path: &std::path::Path,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = read_text(path).lines().find(|l| pred(l)) {
            return Some(l.to_owned());
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` bytes from the kernel's random generator.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).expect("ascii")
}

/// A unique lab name: `l` + 3 digits of the pid + a 2-char counter + 2 chars of time
/// (8 characters, `[a-z0-9]`, matches `^l[0-9]+[a-z0-9]*$`).
fn fresh_name() -> String {
    let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "l{:03}{}{}",
        std::process::id() % 1000,
        base36(u64::from(n), 2),
        base36(u64::from(nanos / 1000), 2)
    )
}

/// Writes a fresh random pool key (64 hex characters, mode 0600) for lab `name`.
fn write_pool_key(name: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .expect("read /dev/urandom");
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = std::env::temp_dir().join(format!("gcb-lab-{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    writeln!(f, "{hex}").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn netlab() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/netlab"));
    cmd.stdin(Stdio::null());
    cmd
}

/// A running network lab. Dropping it kills every process in its namespaces and deletes
/// them.
#[derive(Debug)]
pub struct Lab {
    name: String,
    /// The lab's pool key file (see [`Lab::key_file`]).
    key_file: PathBuf,
}

impl Lab {
    /// Builds a fresh lab with a unique name. Panics (with netlab's message) if it cannot.
    pub fn up() -> Lab {
        require_root();
        let mut last_err = String::new();
        for _ in 0..5 {
            let name = fresh_name();
            let out = netlab()
                .arg("up")
                .arg(&name)
                .output()
                .expect("run scripts/netlab");
            if out.status.success() {
                let key_file = write_pool_key(&name);
                return Lab { name, key_file };
            }
            last_err = String::from_utf8_lossy(&out.stderr).into_owned();
            if !last_err.contains("already exists") {
                // A half-built lab (e.g. nft missing) must not outlive the test: CI
                // fails on leftover namespaces.
                let _ = netlab().arg("down").arg(&name).output();
                break;
            }
        }
        panic!("scripts/netlab up failed: {last_err}");
    }

    /// The lab's name (the namespaces are `NAME-a1`, `NAME-gwa`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lab's pool key file: random, written at [`Lab::up`], removed at drop. Every
    /// command made by [`Lab::cmd`] has `GCB_KEY_FILE` set to it, so the daemons
    /// (`--key-file` defaults to `$GCB_KEY_FILE`), `gcb-run` and the shim all run keyed, as
    /// a deployment does. A test of the unkeyed mode removes the variable
    /// (`cmd.env_remove("GCB_KEY_FILE")`) and starts the daemon with `--insecure`.
    pub fn key_file(&self) -> &std::path::Path {
        &self.key_file
    }

    /// The network namespace of `host`.
    pub fn ns(&self, host: Host) -> String {
        format!("{}-{}", self.name, host.name())
    }

    /// A command that runs `program` inside `host`'s namespace (`ip netns exec NS program`).
    /// Add arguments, environment, stdio as usual; run it with `output()`/`status()`, or with
    /// [`Lab::spawn`] for a process that is killed when its guard drops.
    pub fn cmd(&self, host: Host, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        cmd.env("GCB_KEY_FILE", &self.key_file);
        cmd
    }

    /// [`Lab::cmd`], without the pool key unless `keyed` (what an unkeyed daemon, or a
    /// stranger without the key, runs with).
    pub fn cmd_keyed(&self, host: Host, keyed: bool, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = self.cmd(host, program);
        if !keyed {
            cmd.env_remove("GCB_KEY_FILE");
        }
        cmd
    }

    /// [`Lab::spawn`] with stdout and stderr going to `DIR/NAME.out` and `DIR/NAME.err`
    /// (read them with [`read_text`] / [`wait_line`]); panics if it cannot start.
    pub fn spawn_logged(&self, cmd: &mut Command, dir: &std::path::Path, name: &str) -> Logged {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let create = |p: &std::path::Path| {
            std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
        };
        cmd.stdout(create(&out)).stderr(create(&err));
        let proc = self
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Logged { proc, out, err }
    }

    /// Spawns `cmd` (usually from [`Lab::cmd`]) in a process group of its own and returns a
    /// guard that kills the whole group when dropped. Stdin defaults to null unless the
    /// command set it.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Proc> {
        spawn(cmd)
    }

    /// Runs `program args...` in `host` to completion, killing it after `timeout`, and
    /// returns its output (stdin is null). Never panics for a failing program: check
    /// `status` yourself. A killed program has no exit code (`status.code() == None`).
    pub fn run<I, S>(
        &self,
        host: Host,
        program: impl AsRef<OsStr>,
        args: I,
        timeout: Duration,
    ) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let mut cmd = self.cmd(host, program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match spawn(&mut cmd) {
            Ok(p) => p.finish(timeout),
            Err(e) => panic!("spawn {} in {host}: {e}", program.to_string_lossy()),
        }
    }

    /// Runs a `sh -c SCRIPT` in `host`, like [`Lab::run`].
    pub fn sh(&self, host: Host, script: &str, timeout: Duration) -> Output {
        self.run(host, "sh", ["-c", script], timeout)
    }

    /// True iff a TCP connection from `from` to `addr:port` is established within ~1 s
    /// (`ncat -z`).
    pub fn tcp_connects(&self, from: Host, addr: impl fmt::Display, port: u16) -> bool {
        self.run(
            from,
            "ncat",
            ["-w", "1", "-z", &addr.to_string(), &port.to_string()],
            Duration::from_secs(3),
        )
        .status
        .success()
    }

    /// Waits until a TCP socket listens on `port` in `host` (polls `ss -ltn`).
    pub fn wait_for_tcp_listen(&self, host: Host, port: u16, timeout: Duration) -> io::Result<()> {
        self.wait_for_socket(host, "-Hltn", port, timeout)
    }

    /// Waits until a UDP socket is bound to `port` in `host` (polls `ss -lun`).
    pub fn wait_for_udp_bind(&self, host: Host, port: u16, timeout: Duration) -> io::Result<()> {
        self.wait_for_socket(host, "-Hlun", port, timeout)
    }

    fn wait_for_socket(
        &self,
        host: Host,
        flags: &str,
        port: u16,
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let filter = format!("sport = :{port}");
        loop {
            let out = Command::new("ss")
                .arg("-N")
                .arg(self.ns(host))
                .arg(flags)
                .arg(&filter)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()?;
            if out.status.success() && !out.stdout.iter().all(u8::is_ascii_whitespace) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let what = if flags.contains('t') {
                    "TCP listener"
                } else {
                    "UDP socket"
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no {what} on port {port} in {} after {timeout:?}",
                        self.ns(host)
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Drops `percent`% (0-100) of the packets `gw` (Gwa or Gwb) forwards, both directions;
    /// replaces the previous setting, 0 removes it. Panics on a bad argument or failure.
    pub fn loss(&self, gw: Host, percent: u8) {
        self.loss_of(gw, percent, "all");
    }

    /// Like [`Lab::loss`], for one protocol only: `"udp"` (the GCB/DPF control plane),
    /// `"tcp"` or `"all"`.
    pub fn loss_of(&self, gw: Host, percent: u8, proto: &str) {
        assert!(gw.is_gateway(), "loss: {gw} is not a gateway");
        assert!(percent <= 100, "loss: {percent}% is not a percentage");
        self.netlab(&["loss", &self.name, gw.name(), &percent.to_string(), proto]);
    }

    /// Home-router behaviour on both gateways (`netlab cpe NAME on|off`): new UDP and new
    /// TCP from the public segment to a gateway itself are dropped instead of answered
    /// (port-unreachable, RST), as UDP hole punching and TCP simultaneous open expect.
    pub fn cpe(&self, on: bool) {
        self.netlab(&["cpe", &self.name, if on { "on" } else { "off" }]);
    }

    /// `gw`'s (Gwa or Gwb) masquerade (`netlab nat NAME GW easy|hard`): `hard` is
    /// `random,fully-random`, a random public port per connection (endpoint-dependent, so
    /// hole punching cannot work through it); `!hard` is the default, port-keeping one.
    /// Applies to connections started after it.
    pub fn nat(&self, gw: Host, hard: bool) {
        assert!(gw.is_gateway(), "nat: {gw} is not a gateway");
        self.netlab(&[
            "nat",
            &self.name,
            gw.name(),
            if hard { "hard" } else { "easy" },
        ]);
    }

    /// `gw` (Gwa or Gwb) drops every inbound TCP SYN without ACK it would forward (`netlab
    /// synblock NAME GW on|off`): a firewall refusing inbound connection attempts, the
    /// peer's SYN of a simultaneous open included. Composes with [`Lab::cpe`] and
    /// [`Lab::loss`].
    pub fn synblock(&self, gw: Host, on: bool) {
        assert!(gw.is_gateway(), "synblock: {gw} is not a gateway");
        self.netlab(&[
            "synblock",
            &self.name,
            gw.name(),
            if on { "on" } else { "off" },
        ]);
    }

    /// Adds c1 behind gwc, a 1:1 NAT of [`NAT1TO1_PUBLIC`], and d1 behind c1 (`netlab
    /// nat1to1 NAME`): a host that reaches the public segment only through a 1:1 NAT, as
    /// a cloud VM with a public IP does, and a private host behind it. Opt-in: the
    /// default lab has no such hosts.
    pub fn nat1to1(&self) {
        self.netlab(&["nat1to1", &self.name]);
    }

    /// Runs `scripts/netlab ARGS...`, panicking with its stderr if it fails.
    pub fn netlab(&self, args: &[&str]) {
        let out = netlab().args(args).output().expect("run scripts/netlab");
        assert!(
            out.status.success(),
            "scripts/netlab {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Namespaces of this lab that currently exist (empty after drop).
    pub fn existing_namespaces(&self) -> Vec<String> {
        namespaces_with_prefix(&format!("{}-", self.name))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.key_file);
        match netlab().arg("down").arg(&self.name).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "gcb-lab: scripts/netlab down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("gcb-lab: cannot run scripts/netlab down {}: {e}", self.name),
        }
    }
}

/// A test's scratch directory (logs, payloads, helper programs), named after its lab:
/// created empty, removed when dropped unless the test is panicking or `GCB_TEST_KEEP` is
/// set (then its path is printed, so a failure's logs can be read).
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// `$TMPDIR/gcb-TAG-LABNAME`, emptied.
    pub fn new(tag: &str, lab: &Lab) -> Scratch {
        let dir = std::env::temp_dir().join(format!("gcb-{tag}-{}", lab.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
        Scratch { dir }
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.dir
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("GCB_TEST_KEEP").is_some() {
            eprintln!("gcb-lab: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A process started by [`Lab::spawn_logged`], with where its output goes.
#[derive(Debug)]
pub struct Logged {
    /// The process (killed with its group when dropped).
    pub proc: Proc,
    /// Its stdout file.
    pub out: PathBuf,
    /// Its stderr file.
    pub err: PathBuf,
}

/// Network namespaces (from `ip netns list`) whose name starts with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Spawns `cmd` in a new process group and returns a guard that kills the group on drop.
/// Works for any command, in a lab namespace or not.
pub fn spawn(cmd: &mut Command) -> io::Result<Proc> {
    cmd.process_group(0);
    let child = cmd.spawn()?;
    Ok(Proc {
        child: Some(child),
        out_reader: None,
        err_reader: None,
    })
}

/// A spawned process (and its process group) that is killed when dropped.
///
/// A piped stdout/stderr must be drained while the process runs, or a chatty process blocks
/// on a full pipe: read it yourself (`child_mut().stdout.take()`), or call
/// [`Proc::capture`] right after spawning and get everything from [`Proc::finish`].
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    out_reader: Option<thread::JoinHandle<Vec<u8>>>,
    err_reader: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Proc {
    /// The process id (also the process group id).
    pub fn id(&self) -> u32 {
        self.child().id()
    }

    /// The child, e.g. to take its stdin/stdout pipes.
    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("process already finished")
    }

    /// The child, e.g. to take its stdin/stdout pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("process already finished")
    }

    /// Starts draining the piped stdout/stderr (those not taken yet) in background threads;
    /// [`Proc::finish`] returns what they read.
    pub fn capture(mut self) -> Proc {
        let child = self.child_mut();
        let (out, err) = (child.stdout.take(), child.stderr.take());
        if let Some(out) = out {
            self.out_reader = Some(read_all_in_thread(out));
        }
        if let Some(err) = err {
            self.err_reader = Some(read_all_in_thread(err));
        }
        self
    }

    /// Polls for exit until `timeout`; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the whole process group.
    pub fn signal_group(&self, signal: i32) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let Ok(pgid) = libc::pid_t::try_from(child.id()) else {
            return;
        };
        // SAFETY: kill() has no memory-safety preconditions; a negative pid names our own
        // child's process group (the group lives at least as long as the unreaped child).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }

    /// Kills the process group (SIGTERM, then SIGKILL after 300 ms) and reaps the child.
    /// Returns its exit status.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child_mut().try_wait()? {
            // The leader exited, but others in its group may live on.
            self.signal_group(libc::SIGKILL);
            return Ok(status);
        }
        self.signal_group(libc::SIGTERM);
        let status = match self.wait_timeout(Duration::from_millis(300))? {
            Some(status) => status,
            None => {
                self.signal_group(libc::SIGKILL);
                self.child_mut().wait()?
            }
        };
        self.signal_group(libc::SIGKILL);
        Ok(status)
    }

    /// Collects stdout/stderr (if piped) until the process exits or `timeout` passes (then
    /// the group is killed), and returns the output. Pipes are read concurrently, so large
    /// outputs do not block the child.
    pub fn finish(self, timeout: Duration) -> Output {
        let mut this = self.capture();
        let (out_reader, err_reader) = (this.out_reader.take(), this.err_reader.take());
        let status = match this.wait_timeout(timeout) {
            Ok(Some(status)) => {
                this.signal_group(libc::SIGKILL);
                status
            }
            _ => this
                .kill()
                .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL)),
        };
        this.child = None;
        let join = |r: Option<thread::JoinHandle<Vec<u8>>>| {
            r.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        Output {
            status,
            stdout: join(out_reader),
            stderr: join(err_reader),
        }
    }
}

fn read_all_in_thread<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.kill();
        }
    }
}
