//! FTP across NAT in the lab (issue 12, "programs that put their own address in the
//! payload"): unmodified FTP programs whose data connection goes to an address one side
//! advertises inside the control connection, with every transfer verified end to end
//! (sha256 of the file received against the file served).
//!
//! * Server: Debian's pyftpdlib (`python3-pyftpdlib`, under `/usr/bin/python3`), anonymous
//!   and read-only, started from `tests/programs/ftp_server.py`. Its PASV reply is built
//!   from the control connection's `getsockname()` IP and the data listener's
//!   `getsockname()` port; it binds the data listener to that IP.
//! * Clients: curl (passive: EPSV by default, PASV with `--disable-epsv`; curl ignores the
//!   227's IP by default (`--ftp-skip-pasv-ip` is on since 7.74), so the tests that are about
//!   the advertised IP add `--no-ftp-skip-pasv-ip`, as older curls, browsers' FTP and most
//!   other clients behave; active: `-P -` sends EPRT, with `--disable-eprt` PORT, both built
//!   from the control connection's `getsockname()` IP and the data listener's port) and
//!   Python's ftplib in active mode (`tests/programs/ftp_active_client.py`, PORT).
//!
//! Every positive test has a negative control that fails the same transfer: without the
//! shim, and with the shim's identity model off (`GCB_PUBLIC_NAMES=0`, see the README's
//! identity table): the control connection works, the data connection does not, because
//! the advertised address is the private one.
//!
//! Needs root and the release build (`cargo build --release --workspace`); never skips.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use gcb_lab::{
    artifact, gcb_run, random_bytes, read_text, sha256, tail, wait_line, Broker, Host, Lab, Logged,
    Portfwd, Scratch,
};

const BROKER: &str = "203.0.113.10";
const GWA_PUBLIC: &str = "203.0.113.1";
const P2: &str = "203.0.113.11";
const A1: &str = "10.1.0.11";
/// The FTP servers' control port.
const FTP_PORT: u16 = 2121;
/// A second server on p2 (with `--permit-foreign`).
const FTP_PORT_PERMISSIVE: u16 = 2122;
/// portfwd's public port range.
const DPF_PORTS: &str = "20000-29999";
/// The Debian python that has pyftpdlib (the PATH python3 may be another build).
const SYS_PY: &str = "/usr/bin/python3";
/// The served file (an odd size, so a short read cannot pass).
const FILE: &str = "payload.bin";
const FILE_SIZE: usize = (1 << 20) + 4097;

/// Time for a server to come up.
const UP: Duration = Duration::from_secs(15);
/// Bound for one client run (curl itself gives up after `--max-time`).
const RUN: Duration = Duration::from_secs(40);

const FTP_SERVER: &str = include_str!("programs/ftp_server.py");
const FTP_ACTIVE_CLIENT: &str = include_str!("programs/ftp_active_client.py");

/// One lab and its scratch directory (programs, served root, downloads, logs).
struct Rig {
    dir: Scratch,
    lab: Lab,
    /// sha256 of the served file.
    sha: String,
}

/// What one client run did.
struct Fetch {
    name: String,
    /// Exit status success.
    ok: bool,
    /// The exit status, for messages.
    status: String,
    /// Everything it printed (curl -v: `> CMD` and `< REPLY` lines; ftplib: `*cmd*`).
    wire: String,
    /// sha256 of the downloaded file, if there is one.
    sha: Option<String>,
}

/// Where an advertised address must lead (see `Rig::assert_reachable`).
#[derive(Clone, Copy)]
enum Via {
    /// GCB: a proxy on the broker.
    Broker,
    /// DPF: a public port of the gateway, mapped by the shim of this program (its log name).
    Gateway(&'static str),
}
impl Rig {
    fn up(tag: &str) -> Rig {
        for bin in ["gcb-brokerd", "gcb-portfwd", "libgcb.so"] {
            artifact(bin);
        }
        assert!(
            Command::new(SYS_PY)
                .args(["-c", "import pyftpdlib"])
                .status()
                .is_ok_and(|s| s.success()),
            "{SYS_PY} has no pyftpdlib: run scripts/install-deps (python3-pyftpdlib)"
        );
        let lab = Lab::up();
        let dir = Scratch::new(&format!("ftp-{tag}"), &lab);
        fs::write(dir.join("ftp_server.py"), FTP_SERVER).unwrap();
        fs::write(dir.join("ftp_active_client.py"), FTP_ACTIVE_CLIENT).unwrap();
        fs::create_dir_all(dir.join("root")).unwrap();
        let data = random_bytes(FILE_SIZE);
        fs::write(dir.join("root").join(FILE), &data).unwrap();
        Rig {
            sha: sha256(&data),
            dir,
            lab,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn broker(&self) -> Broker {
        Broker::start(
            &self.lab,
            Host::P1,
            BROKER,
            true,
            &[],
            &self.path("broker.log"),
        )
    }

    fn portfwd(&self) -> Portfwd {
        Portfwd::start(
            &self.lab,
            &self.dir,
            &["--private", "10.1.0.0/24", "--ports", DPF_PORTS],
        )
    }

    /// A command in `host`: under `gcb-run SHIM --log info --log-file DIR/NAME.shim.log` if
    /// `shim` is given, else plain; `env` added.
    fn cmd(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        env: &[(&str, &str)],
        name: &str,
        prog: &str,
    ) -> Command {
        let mut cmd = match shim {
            Some(opts) => {
                let log = self.path(&format!("{name}.shim.log"));
                let mut c = gcb_run(&self.lab, host, true, opts, Some(("info", &log)));
                c.arg(prog);
                c
            }
            None => self.lab.cmd(host, prog),
        };
        cmd.envs(env.iter().copied());
        cmd
    }

    /// Starts ftp_server.py (serving DIR/root on `port`, `extra` options) in `host` as NAME
    /// and returns it with the IPv4 address it printed (its listener's getsockname()).
    fn server(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        env: &[(&str, &str)],
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> (Logged, SocketAddrV4) {
        match self.server_any(host, shim, env, name, port, extra) {
            (server, SocketAddr::V4(addr)) => (server, addr),
            (_, addr) => panic!("{name}: an IPv4 listener reports {addr}"),
        }
    }

    /// [`Rig::server`] for a listener of either family (`--host ::`).
    fn server_any(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        env: &[(&str, &str)],
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> (Logged, SocketAddr) {
        let mut cmd = self.cmd(host, shim, env, name, SYS_PY);
        cmd.arg("-u")
            .arg(self.path("ftp_server.py"))
            .arg(self.path("root"))
            .arg(port.to_string())
            .args(extra);
        let server = self.lab.spawn_logged(&mut cmd, &self.dir, name);
        let line = wait_line(&server.out, UP, |l| l.starts_with("ADDR ")).unwrap_or_else(|| {
            panic!(
                "{name} did not come up; stderr:\n{}",
                tail(&read_text(&server.err), 30)
            )
        });
        let addr = line["ADDR ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: bad {line:?}: {e}"));
        (server, addr)
    }

    /// `curl -v --max-time 15 -o DIR/NAME.bin URL EXTRA...` in `host`.
    fn curl(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        env: &[(&str, &str)],
        name: &str,
        url: &str,
        extra: &[&str],
    ) -> Fetch {
        let out_file = self.path(&format!("{name}.bin"));
        let mut cmd = self.cmd(host, shim, env, name, "curl");
        cmd.args(["-sS", "-v", "--max-time", "15", "-o"])
            .arg(&out_file)
            .args(extra)
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.finish(name, cmd, out_file)
    }

    /// ftp_active_client.py (Python's ftplib, active mode) in `host`, fetching FILE from
    /// `server`.
    fn ftplib_active(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        env: &[(&str, &str)],
        name: &str,
        server: &str,
        port: u16,
    ) -> Fetch {
        let out_file = self.path(&format!("{name}.bin"));
        let mut cmd = self.cmd(host, shim, env, name, SYS_PY);
        cmd.arg("-u")
            .arg(self.path("ftp_active_client.py"))
            .args([server, &port.to_string(), FILE])
            .arg(&out_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.finish(name, cmd, out_file)
    }

    fn finish(&self, name: &str, mut cmd: Command, out_file: PathBuf) -> Fetch {
        let out = self
            .lab
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
            .finish(RUN);
        let wire = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(self.path(&format!("{name}.wire")), &wire).unwrap();
        let sha = fs::read(&out_file).ok().map(|d| sha256(&d));
        Fetch {
            name: name.to_owned(),
            ok: out.status.success(),
            status: format!("{:?}", out.status),
            wire,
            sha,
        }
    }

    /// Panics unless `f` succeeded and received exactly the served file; `logs` (scratch
    /// file names) are shown on failure.
    fn assert_fetched(&self, f: &Fetch, logs: &[&str]) {
        if f.ok && f.sha.as_deref() == Some(self.sha.as_str()) {
            return;
        }
        let mut msg = format!(
            "{}: transfer failed ({}, sha {:?}, want {}); its wire:\n{}",
            f.name,
            f.status,
            f.sha,
            self.sha,
            tail(&f.wire, 40)
        );
        for l in logs {
            msg += &format!("\n--- {l}:\n{}", tail(&read_text(&self.path(l)), 30));
        }
        panic!("{msg}");
    }

    /// Panics unless `f` failed to get the file.
    fn assert_not_fetched(&self, f: &Fetch) {
        assert!(
            !f.ok && f.sha.as_deref() != Some(self.sha.as_str()),
            "{}: the transfer should have failed, but it worked; wire:\n{}",
            f.name,
            tail(&f.wire, 40)
        );
    }

    /// Every proxy port the broker registered for a TCP listener so far.
    fn broker_proxy_ports(&self) -> Vec<u16> {
        read_text(&self.path("broker.log"))
            .lines()
            .filter(|l| l.contains("registered tcp listener"))
            .filter_map(|l| l.split("-> proxy ").nth(1))
            .filter_map(|w| w.split_whitespace().next())
            .filter_map(|w| w.trim_end_matches([',', ')']).parse::<SocketAddrV4>().ok())
            .map(|a| a.port())
            .collect()
    }

    /// Panics unless `port` (advertised in `what`) is a proxy the broker registered.
    /// An EPSV download (curl's default) by curl on `host` (under the shim with `shim`):
    /// the file arrives intact and the 229 names a port the broker registered as a proxy.
    fn gcb_epsv_case(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        name: &str,
        url: &str,
        logs: &[&str],
    ) {
        let f = self.curl(host, shim, &[], name, url, &[]);
        show(&f, PASSIVE_WIRE);
        self.assert_fetched(&f, logs);
        self.assert_proxy_port("229", epsv_port(&f));
    }

    /// A PASV download (curl with `extra`, which includes `--disable-epsv`): the file
    /// arrives intact and the 227 carries the broker's IP and a registered proxy port.
    fn gcb_pasv_case(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        name: &str,
        url: &str,
        extra: &[&str],
        logs: &[&str],
    ) {
        let f = self.curl(host, shim, &[], name, url, extra);
        show(&f, PASSIVE_WIRE);
        self.assert_fetched(&f, logs);
        self.assert_reachable(&format!("{name}: 227"), pasv_addr(&f), Via::Broker);
    }

    /// Panics unless `adv` (advertised in `what`, e.g. "227" or "PORT") is an address where
    /// the program can be reached: under GCB the broker's IP and a proxy it registered,
    /// under DPF the gateway's public IP and a port the shim of `Via::Gateway`'s program
    /// mapped.
    fn assert_reachable(&self, what: &str, adv: SocketAddrV4, via: Via) {
        match via {
            Via::Broker => {
                assert_eq!(*adv.ip(), ip(BROKER), "{what} must carry the broker's IP");
                self.assert_proxy_port(what, adv.port());
            }
            Via::Gateway(name) => {
                assert_eq!(
                    *adv.ip(),
                    ip(GWA_PUBLIC),
                    "{what} must carry the gateway's public IP"
                );
                self.assert_dpf_port(name, what, adv.port());
            }
        }
    }

    fn assert_proxy_port(&self, what: &str, port: u16) {
        let ports = self.broker_proxy_ports();
        assert!(
            ports.contains(&port),
            "{what} port {port} is not a proxy the broker registered: {ports:?}"
        );
    }

    /// Panics unless `port` (advertised in `what`) is a public port NAME's shim mapped.
    fn assert_dpf_port(&self, name: &str, what: &str, port: u16) {
        let ports = self.dpf_mapped_ports(name);
        assert!(
            ports.contains(&port),
            "{what} port {port} is not a public port DPF mapped for {name}: {ports:?}"
        );
    }

    /// Every public port the shim of NAME logged as mapped by DPF.
    fn dpf_mapped_ports(&self, name: &str) -> Vec<u16> {
        let needle = format!("-> public {GWA_PUBLIC}:");
        read_text(&self.path(&format!("{name}.shim.log")))
            .lines()
            .filter(|l| l.contains("DPF mapped"))
            .filter_map(|l| l.split(&needle).nth(1))
            .filter_map(|r| {
                r.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .ok()
            })
            .collect()
    }
}

/// Runs each sub-case of a test to its end even when an earlier one failed, so one run
/// reports every client's outcome (each failure's panic message is printed as it happens);
/// [`Cases::finish`] then fails the test naming the failed sub-cases.
#[derive(Default)]
struct Cases {
    failed: Vec<String>,
}

impl Cases {
    fn run(&mut self, name: &str, case: impl FnOnce()) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)).is_err() {
            self.failed.push(name.to_owned());
        }
    }

    fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "failed sub-cases: {:?}",
            self.failed
        );
    }
}

/// The first line of `wire` starting with `prefix` (after trimming); panics without one.
fn wire_line<'a>(f: &'a Fetch, prefix: &str) -> &'a str {
    f.wire
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "{}: no {prefix:?} line on the wire:\n{}",
                f.name,
                tail(&f.wire, 40)
            )
        })
}

/// `h1,h2,h3,h4,p1,p2` (PASV reply or PORT argument) as an address.
fn parse_hostport(s: &str) -> SocketAddrV4 {
    let n: Vec<u16> = s
        .split(',')
        .map(|x| x.trim().parse().unwrap_or_else(|_| panic!("bad {s:?}")))
        .collect();
    assert_eq!(n.len(), 6, "bad host-port {s:?}");
    let b = |i: usize| u8::try_from(n[i]).unwrap_or_else(|_| panic!("bad {s:?}"));
    SocketAddrV4::new(Ipv4Addr::new(b(0), b(1), b(2), b(3)), n[4] * 256 + n[5])
}

/// The address in the 227 reply curl received (`< 227 Entering passive mode (h,h,h,h,p,p).`).
fn pasv_addr(f: &Fetch) -> SocketAddrV4 {
    let line = wire_line(f, "< 227");
    let inner = line
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .unwrap_or_else(|| panic!("{}: bad 227 {line:?}", f.name))
        .0;
    parse_hostport(inner)
}

/// The port in the 229 reply curl received (`< 229 Entering extended passive mode (|||P|).`).
fn epsv_port(f: &Fetch) -> u16 {
    let line = wire_line(f, "< 229");
    line.split("|||")
        .nth(1)
        .and_then(|r| r.split('|').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{}: bad 229 {line:?}", f.name))
}

/// The address of the EPRT curl sent (`> EPRT |1|IP|PORT|`).
fn eprt_addr(f: &Fetch) -> SocketAddrV4 {
    let line = wire_line(f, "> EPRT ");
    let parts: Vec<&str> = line.split('|').collect();
    assert!(parts.len() >= 4 && parts[1] == "1", "bad {line:?}");
    SocketAddrV4::new(
        parts[2].parse().unwrap_or_else(|_| panic!("bad {line:?}")),
        parts[3].parse().unwrap_or_else(|_| panic!("bad {line:?}")),
    )
}

/// The address of the PORT command sent: curl's `> PORT h,h,h,h,p,p` or ftplib's
/// `*cmd* 'PORT h,h,h,h,p,p'`.
fn port_cmd_addr(f: &Fetch) -> SocketAddrV4 {
    let line = f
        .wire
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("> PORT ") || l.starts_with("*cmd* 'PORT "))
        .unwrap_or_else(|| panic!("{}: no PORT on the wire:\n{}", f.name, f.wire));
    let arg = line
        .split("PORT ")
        .nth(1)
        .unwrap()
        .trim_end_matches('\'')
        .trim();
    parse_hostport(arg)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Prints what went over the wire (the reports quote it).
fn show(f: &Fetch, prefixes: &[&str]) {
    for l in f.wire.lines().map(str::trim) {
        if prefixes.iter().any(|p| l.starts_with(p)) {
            eprintln!("{}: {l}", f.name);
        }
    }
}

const PASSIVE_WIRE: &[&str] = &["< 227", "< 229", "< 425", "> PASV", "> EPSV"];
const ACTIVE_WIRE: &[&str] = &[
    "> EPRT",
    "> PORT",
    "*cmd* 'PORT",
    "< 200",
    "< 501",
    "< 425",
    "*resp* '200",
    "*resp* '501",
];

// ---------------------------------------------------------------------------------------
// 1. Passive server behind NAT under GCB
// ---------------------------------------------------------------------------------------

/// pyftpdlib in a1 under `gcb-run --broker`, curl on p2 (no shim): EPSV (curl's default),
/// PASV with curl's default of ignoring the 227's IP, and PASV using the advertised IP.
/// The 227 must carry the broker's IP and a proxy port the broker registered; the 229 a
/// proxy port; every download is the served file.
#[test]
fn passive_server_gcb_reached_from_p2() {
    let rig = Rig::up("pasv-gcb-p2");
    let _broker = rig.broker();
    let shim: &[&str] = &["--broker", BROKER];
    let (_server, addr) = rig.server(Host::A1, Some(shim), &[], "server", FTP_PORT, &[]);
    assert_eq!(*addr.ip(), ip(BROKER), "the server's listener is its proxy");
    let url = format!("ftp://{addr}/{FILE}");
    let logs = ["server.err", "server.shim.log", "broker.log"];
    let mut cases = Cases::default();

    cases.run("p2-epsv", || {
        rig.gcb_epsv_case(Host::P2, None, "p2-epsv", &url, &logs)
    });
    for (name, extra) in [
        ("p2-pasv", &["--disable-epsv"][..]),
        (
            "p2-pasv-ip",
            &["--disable-epsv", "--no-ftp-skip-pasv-ip"][..],
        ),
    ] {
        cases.run(name, || {
            rig.gcb_pasv_case(Host::P2, None, name, &url, extra, &logs)
        });
    }
    cases.finish();
}

/// The same server reached from b1 (private -> other private), curl under
/// `gcb-run --broker`: EPSV and PASV using the advertised IP.
#[test]
fn passive_server_gcb_reached_from_b1() {
    let rig = Rig::up("pasv-gcb-b1");
    let _broker = rig.broker();
    let shim: &[&str] = &["--broker", BROKER];
    let (_server, addr) = rig.server(Host::A1, Some(shim), &[], "server", FTP_PORT, &[]);
    let url = format!("ftp://{addr}/{FILE}");
    let logs = ["server.err", "server.shim.log", "broker.log"];
    let mut cases = Cases::default();

    cases.run("b1-epsv", || {
        rig.gcb_epsv_case(Host::B1, Some(shim), "b1-epsv", &url, &logs)
    });
    cases.run("b1-pasv-ip", || {
        let extra = ["--disable-epsv", "--no-ftp-skip-pasv-ip"];
        rig.gcb_pasv_case(Host::B1, Some(shim), "b1-pasv-ip", &url, &extra, &logs)
    });
    cases.finish();
}

/// The same passive server listening on `::` (pyftpdlib's `("::", port)`: one AF_INET6
/// socket, dual-stack by Linux's default), in a1 under `gcb-run --broker`, curl on p2: the
/// listener is registered and reports its proxy as `[::ffff:203.0.113.10]:PORT`; pyftpdlib
/// builds its PASV from the control connection's `::ffff:` name (and binds the data
/// listener to it), so the 227 must carry the broker's IP and a proxy port.
#[test]
fn passive_server_dualstack_gcb_reached_from_p2() {
    let rig = Rig::up("pasv-gcb-dual");
    let _broker = rig.broker();
    let shim: &[&str] = &["--broker", BROKER];
    let (_server, addr) = rig.server_any(
        Host::A1,
        Some(shim),
        &[],
        "server",
        FTP_PORT,
        &["--host", "::"],
    );
    let SocketAddr::V6(addr6) = addr else {
        panic!("pyftpdlib on :: should have an AF_INET6 listener, reports {addr}")
    };
    assert_eq!(
        addr6.ip().to_ipv4_mapped(),
        Some(ip(BROKER)),
        "the dual-stack listener reports its proxy as ::ffff:{BROKER}, reports {addr}"
    );
    let url = format!("ftp://{BROKER}:{}/{FILE}", addr6.port());
    let logs = ["server.err", "server.shim.log", "broker.log"];
    let mut cases = Cases::default();

    cases.run("p2-epsv", || {
        rig.gcb_epsv_case(Host::P2, None, "p2-epsv", &url, &logs)
    });
    cases.run("p2-pasv-ip", || {
        let extra = ["--disable-epsv", "--no-ftp-skip-pasv-ip"];
        rig.gcb_pasv_case(Host::P2, None, "p2-pasv-ip", &url, &extra, &logs)
    });
    cases.finish();
}

/// Negative control for [`passive_server_dualstack_gcb_reached_from_p2`]: the dual-stack
/// server without the shim cannot be reached from p2.
#[test]
fn passive_server_dualstack_gcb_negative_without_shim() {
    let rig = Rig::up("pasv-dual-noshim");
    let _broker = rig.broker();
    let (_server, addr) =
        rig.server_any(Host::A1, None, &[], "server", FTP_PORT, &["--host", "::"]);
    assert!(
        addr.is_ipv6(),
        "pyftpdlib on :: listens on AF_INET6: {addr}"
    );
    for target in [A1, GWA_PUBLIC] {
        let f = rig.curl(
            Host::P2,
            None,
            &[],
            &format!("p2-to-{target}"),
            &format!("ftp://{target}:{FTP_PORT}/{FILE}"),
            &["--connect-timeout", "3"],
        );
        rig.assert_not_fetched(&f);
    }
}

/// Negative control: the same server without the shim (broker running) cannot be reached
/// from p2 or b1, neither at its private address nor at the NAT's public one.
#[test]
fn passive_server_gcb_negative_without_shim() {
    let rig = Rig::up("pasv-gcb-noshim");
    let _broker = rig.broker();
    let (_server, addr) = rig.server(Host::A1, None, &[], "server", FTP_PORT, &[]);
    assert_eq!(addr, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, FTP_PORT));
    for (host, target) in [
        (Host::P2, A1),
        (Host::P2, GWA_PUBLIC),
        (Host::B1, A1),
        (Host::B1, GWA_PUBLIC),
    ] {
        let name = format!("{host}-to-{target}");
        let f = rig.curl(
            host,
            None,
            &[],
            &name,
            &format!("ftp://{target}:{FTP_PORT}/{FILE}"),
            &["--connect-timeout", "3"],
        );
        rig.assert_not_fetched(&f);
    }
}

/// Negative control, the point: the server under `gcb-run --broker` with the
/// identity model off (`GCB_PUBLIC_NAMES=0`). The control connection works through the
/// proxy (login accepted), but the 227 reply advertises the private address, so a client
/// that uses it cannot open the data connection.
#[test]
fn passive_server_gcb_negative_without_public_names() {
    let rig = Rig::up("pasv-gcb-nonames");
    let _broker = rig.broker();
    let shim: &[&str] = &["--broker", BROKER];
    let env = [("GCB_PUBLIC_NAMES", "0")];
    let (_server, addr) = rig.server(Host::A1, Some(shim), &env, "server", FTP_PORT, &[]);
    assert_eq!(*addr.ip(), ip(BROKER), "the listener is still registered");
    let f = rig.curl(
        Host::P2,
        None,
        &[],
        "p2-pasv-ip",
        &format!("ftp://{addr}/{FILE}"),
        &["--disable-epsv", "--no-ftp-skip-pasv-ip"],
    );
    show(&f, PASSIVE_WIRE);
    wire_line(&f, "< 230"); // logged in: the control connection works
    assert_eq!(*pasv_addr(&f).ip(), ip(A1), "227 advertises the private IP");
    rig.assert_not_fetched(&f);
}

// ---------------------------------------------------------------------------------------
// 2. Passive server behind NAT under DPF
// ---------------------------------------------------------------------------------------

/// pyftpdlib in a1 under `gcb-run --dpf 10.1.0.1` (portfwd on gwa), curl on p2 at the
/// gateway's public address: EPSV, PASV, PASV using the advertised IP. The 227 must carry
/// the gateway's public IP and a public port DPF mapped for the server.
#[test]
fn passive_server_dpf_reached_from_p2() {
    let rig = Rig::up("pasv-dpf");
    let _portfwd = rig.portfwd();
    let shim: &[&str] = &["--dpf", "10.1.0.1"];
    let (_server, addr) = rig.server(Host::A1, Some(shim), &[], "server", FTP_PORT, &[]);
    assert_eq!(*addr.ip(), ip(GWA_PUBLIC), "the listener is mapped");
    let url = format!("ftp://{addr}/{FILE}");
    let logs = ["server.err", "server.shim.log", "portfwd-1.log"];
    let mut cases = Cases::default();

    cases.run("p2-epsv", || {
        let epsv = rig.curl(Host::P2, None, &[], "p2-epsv", &url, &[]);
        show(&epsv, PASSIVE_WIRE);
        rig.assert_fetched(&epsv, &logs);
        rig.assert_dpf_port("server", "229", epsv_port(&epsv));
    });
    for (name, extra) in [
        ("p2-pasv", &["--disable-epsv"][..]),
        (
            "p2-pasv-ip",
            &["--disable-epsv", "--no-ftp-skip-pasv-ip"][..],
        ),
    ] {
        cases.run(name, || {
            let f = rig.curl(Host::P2, None, &[], name, &url, extra);
            show(&f, PASSIVE_WIRE);
            rig.assert_fetched(&f, &logs);
            rig.assert_reachable(
                &format!("{name}: 227"),
                pasv_addr(&f),
                Via::Gateway("server"),
            );
        });
    }
    cases.finish();
}

/// Negative control: without the shim (portfwd running) the server cannot be reached at
/// the gateway's public address.
#[test]
fn passive_server_dpf_negative_without_shim() {
    let rig = Rig::up("pasv-dpf-noshim");
    let _portfwd = rig.portfwd();
    let (_server, _) = rig.server(Host::A1, None, &[], "server", FTP_PORT, &[]);
    let f = rig.curl(
        Host::P2,
        None,
        &[],
        "p2",
        &format!("ftp://{GWA_PUBLIC}:{FTP_PORT}/{FILE}"),
        &["--connect-timeout", "3"],
    );
    rig.assert_not_fetched(&f);
}

/// Negative control: under DPF with the identity model off, the control connection works
/// at the public mapping but the 227 advertises the private IP.
#[test]
fn passive_server_dpf_negative_without_public_names() {
    let rig = Rig::up("pasv-dpf-nonames");
    let _portfwd = rig.portfwd();
    let shim: &[&str] = &["--dpf", "10.1.0.1"];
    let env = [("GCB_PUBLIC_NAMES", "0")];
    let (_server, addr) = rig.server(Host::A1, Some(shim), &env, "server", FTP_PORT, &[]);
    assert_eq!(*addr.ip(), ip(GWA_PUBLIC), "the listener is still mapped");
    let f = rig.curl(
        Host::P2,
        None,
        &[],
        "p2-pasv-ip",
        &format!("ftp://{addr}/{FILE}"),
        &["--disable-epsv", "--no-ftp-skip-pasv-ip"],
    );
    show(&f, PASSIVE_WIRE);
    wire_line(&f, "< 230");
    assert_eq!(*pasv_addr(&f).ip(), ip(A1), "227 advertises the private IP");
    rig.assert_not_fetched(&f);
}

// ---------------------------------------------------------------------------------------
// 3. Active client behind NAT
// ---------------------------------------------------------------------------------------

/// Active FTP from a1 under `gcb-run --dpf 10.1.0.1` to pyftpdlib on p2 with its default
/// policy (a PORT/EPRT must name the control connection's peer, here the NAT's public
/// IP): curl `-P -` (EPRT), curl `-P - --disable-eprt` (PORT), ftplib (PORT). Each must
/// advertise the gateway's public IP and a port DPF mapped for it, and get the file.
#[test]
fn active_client_dpf() {
    let rig = Rig::up("active-dpf");
    let _portfwd = rig.portfwd();
    let (_server, _) = rig.server(Host::P2, None, &[], "server", FTP_PORT, &[]);
    let shim: &[&str] = &["--dpf", "10.1.0.1"];
    let url = format!("ftp://{P2}:{FTP_PORT}/{FILE}");
    let mut cases = Cases::default();

    cases.run("curl-eprt", || {
        let f = rig.curl(Host::A1, Some(shim), &[], "curl-eprt", &url, &["-P", "-"]);
        show(&f, ACTIVE_WIRE);
        rig.assert_fetched(&f, &["server.err", "curl-eprt.shim.log", "portfwd-1.log"]);
        rig.assert_reachable("EPRT", eprt_addr(&f), Via::Gateway("curl-eprt"));
    });
    cases.run("curl-port", || {
        let f = rig.curl(
            Host::A1,
            Some(shim),
            &[],
            "curl-port",
            &url,
            &["-P", "-", "--disable-eprt"],
        );
        show(&f, ACTIVE_WIRE);
        rig.assert_fetched(&f, &["server.err", "curl-port.shim.log", "portfwd-1.log"]);
        rig.assert_reachable("PORT", port_cmd_addr(&f), Via::Gateway("curl-port"));
    });
    cases.run("ftplib", || {
        let f = rig.ftplib_active(Host::A1, Some(shim), &[], "ftplib", P2, FTP_PORT);
        show(&f, ACTIVE_WIRE);
        rig.assert_fetched(&f, &["server.err", "ftplib.shim.log", "portfwd-1.log"]);
        rig.assert_reachable("ftplib's PORT", port_cmd_addr(&f), Via::Gateway("ftplib"));
    });
    cases.finish();
}

/// Negative control for [`active_client_dpf`]: without the shim, and under the shim with the
/// identity model off, the clients advertise 10.1.0.11 and the server refuses it.
#[test]
fn active_client_dpf_negative() {
    let rig = Rig::up("active-dpf-neg");
    let _portfwd = rig.portfwd();
    let (_server, _) = rig.server(Host::P2, None, &[], "server", FTP_PORT, &[]);
    let shim: &[&str] = &["--dpf", "10.1.0.1"];
    let url = format!("ftp://{P2}:{FTP_PORT}/{FILE}");
    let off = [("GCB_PUBLIC_NAMES", "0")];

    for (name, shim, env) in [("plain", None, &[][..]), ("no-names", Some(shim), &off[..])] {
        let f = rig.curl(
            Host::A1,
            shim,
            env,
            &format!("curl-{name}"),
            &url,
            &["-P", "-"],
        );
        show(&f, ACTIVE_WIRE);
        assert_eq!(*eprt_addr(&f).ip(), ip(A1), "EPRT carries the private IP");
        wire_line(&f, "< 501");
        rig.assert_not_fetched(&f);

        let py = rig.ftplib_active(Host::A1, shim, env, &format!("ftplib-{name}"), P2, FTP_PORT);
        show(&py, ACTIVE_WIRE);
        assert_eq!(
            *port_cmd_addr(&py).ip(),
            ip(A1),
            "PORT carries the private IP"
        );
        rig.assert_not_fetched(&py);
    }
    let log = read_text(&rig.path("server.err"));
    assert!(
        log.contains(&format!("Rejected data connection to foreign address {A1}")),
        "the server should have refused the private address:\n{}",
        tail(&log, 30)
    );
}

/// Active FTP from a1 under `gcb-run --broker` to pyftpdlib on p2. The client advertises
/// the broker's IP and a proxy port (the data listener's registration), while its control
/// connection reaches p2 from the NAT's public IP 203.0.113.1: pyftpdlib's default policy
/// refuses a PORT/EPRT whose IP is not the control connection's peer (asserted below:
/// `501 Rejected data connection to foreign address`), an FTP-server policy against
/// bounce attacks, not a GCB bug. So the transfers go to a second server on p2 with
/// `permit_foreign_addresses = True` (`--permit-foreign`): curl `-P -` (EPRT), curl
/// `--disable-eprt` (PORT) and ftplib (PORT) must get the file through the proxy.
/// curl takes the EPRT/PORT port from `getsockname()` after `bind()` and before
/// `listen()` (ftp.c, "get the name again after the bind()"), ftplib after `listen()`: curl
/// needs the proxy registered by the time of that first `getsockname()`.
#[test]
fn active_client_gcb() {
    let rig = Rig::up("active-gcb");
    let _broker = rig.broker();
    let (_strict, _) = rig.server(Host::P2, None, &[], "strict", FTP_PORT, &[]);
    let (_server, _) = rig.server(
        Host::P2,
        None,
        &[],
        "server",
        FTP_PORT_PERMISSIVE,
        &["--permit-foreign"],
    );
    let shim: &[&str] = &["--broker", BROKER];
    let url = format!("ftp://{P2}:{FTP_PORT_PERMISSIVE}/{FILE}");
    let mut cases = Cases::default();

    cases.run("curl-eprt", || {
        let f = rig.curl(Host::A1, Some(shim), &[], "curl-eprt", &url, &["-P", "-"]);
        show(&f, ACTIVE_WIRE);
        rig.assert_fetched(&f, &["server.err", "curl-eprt.shim.log", "broker.log"]);
        rig.assert_reachable("EPRT", eprt_addr(&f), Via::Broker);
    });
    cases.run("curl-port", || {
        let f = rig.curl(
            Host::A1,
            Some(shim),
            &[],
            "curl-port",
            &url,
            &["-P", "-", "--disable-eprt"],
        );
        show(&f, ACTIVE_WIRE);
        rig.assert_fetched(&f, &["server.err", "curl-port.shim.log", "broker.log"]);
        rig.assert_reachable("PORT", port_cmd_addr(&f), Via::Broker);
    });
    cases.run("ftplib", || {
        let f = rig.ftplib_active(Host::A1, Some(shim), &[], "ftplib", P2, FTP_PORT_PERMISSIVE);
        show(&f, ACTIVE_WIRE);
        rig.assert_fetched(&f, &["server.err", "ftplib.shim.log", "broker.log"]);
        rig.assert_reachable("ftplib's PORT", port_cmd_addr(&f), Via::Broker);
    });
    // The default policy refuses the broker's IP (not the control connection's peer).
    cases.run("curl-strict", || {
        let f = rig.curl(
            Host::A1,
            Some(shim),
            &[],
            "curl-strict",
            &format!("ftp://{P2}:{FTP_PORT}/{FILE}"),
            &["-P", "-"],
        );
        show(&f, ACTIVE_WIRE);
        rig.assert_not_fetched(&f);
        let log = read_text(&rig.path("strict.err"));
        assert!(
            log.contains(&format!(
                "Rejected data connection to foreign address {BROKER}"
            )),
            "pyftpdlib's default policy should refuse the broker's IP:\n{}",
            tail(&log, 30)
        );
    });
    cases.finish();
}

/// Negative control for [`active_client_gcb`], against the permissive server: without the
/// shim, and under the shim with the identity model off, the client advertises 10.1.0.11,
/// which the server on p2 cannot reach.
#[test]
fn active_client_gcb_negative() {
    let rig = Rig::up("active-gcb-neg");
    let _broker = rig.broker();
    let (_server, _) = rig.server(
        Host::P2,
        None,
        &[],
        "server",
        FTP_PORT_PERMISSIVE,
        &["--permit-foreign"],
    );
    let shim: &[&str] = &["--broker", BROKER];
    let url = format!("ftp://{P2}:{FTP_PORT_PERMISSIVE}/{FILE}");
    let off = [("GCB_PUBLIC_NAMES", "0")];

    for (name, shim, env) in [("plain", None, &[][..]), ("no-names", Some(shim), &off[..])] {
        let f = rig.curl(
            Host::A1,
            shim,
            env,
            &format!("curl-{name}"),
            &url,
            &["-P", "-"],
        );
        show(&f, ACTIVE_WIRE);
        assert_eq!(*eprt_addr(&f).ip(), ip(A1), "EPRT carries the private IP");
        rig.assert_not_fetched(&f);

        let py = rig.ftplib_active(
            Host::A1,
            shim,
            env,
            &format!("ftplib-{name}"),
            P2,
            FTP_PORT_PERMISSIVE,
        );
        show(&py, ACTIVE_WIRE);
        assert_eq!(
            *port_cmd_addr(&py).ip(),
            ip(A1),
            "PORT carries the private IP"
        );
        rig.assert_not_fetched(&py);
    }
}
