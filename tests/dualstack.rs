//! Dual-stack sockets in the lab (issue #12, item 1): unmodified programs whose listening
//! socket is AF_INET6 bound to `::` with IPV6_V6ONLY off (Node.js `net.createServer` and
//! `dgram.createSocket('udp6')`, Python `socket.create_server(..., dualstack_ipv6=True)`)
//! run in a1 under `scripts/gcb-run` (GCB with the broker on p1, or DPF with portfwd on
//! gwa) and are reached from p2 and b1 over IPv4, every payload checked by sha256 at the
//! other end. What each program reports about itself is asserted too: `getsockname()` of
//! the listener is the proxy (GCB) or the public mapping (DPF) in the IPv4-mapped form
//! (`::ffff:203.0.113.10`), peers are `::ffff:PEER`.
//!
//! Each positive test has a negative control: the same program without the shim serves
//! locally (a2 reaches it) but is unreachable from p2. A v6-only socket under the shim is
//! left alone (no registration, its real address, works over `::1`).
//!
//! Nothing is built here: `cargo build --release --workspace` first. Needs root, node
//! (Debian `nodejs`) and python3; never skips.

use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use gcb_lab::{
    artifact, gcb_run, parse_after, portfwd_maps, python, random_bytes, read_text, sha256,
    wait_line, Broker, Host, Lab, Logged, Portfwd, Scratch,
};

const P1: &str = "203.0.113.10";
const P2: &str = "203.0.113.11";
const GWA: &str = "203.0.113.1";
const A1: &str = "10.1.0.11";
/// portfwd's public port range in these tests.
const PORTS: &str = "20000-29999";

/// Time for a server to come up and register, and for one short client run.
const T: Duration = Duration::from_secs(10);
/// Bound for one client run that moves data.
const RUN: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

/// Node.js TCP echo server, `listen(PORT)` without a host; prints `ADDR <server.address()>`
/// and `CONN <remoteAddress> <remotePort> <localAddress> <localPort>` per connection.
const NODE_TCP_ECHO: &str = include_str!("programs/ds_node_tcp_echo.js");
/// Node.js TCP client `HOST PORT N`: sends N random bytes, reads the echo; prints `LOCAL
/// ...`, `SENT <sha> <n>`, `ECHO <sha> <n>`.
const NODE_TCP_CLIENT: &str = include_str!("programs/ds_node_tcp_client.js");
/// Node.js `udp6` echo server on PORT; prints `ADDR <socket.address()>` and `FROM
/// <rinfo.address> <rinfo.port> <len> <sha>` per datagram.
const NODE_UDP_ECHO: &str = include_str!("programs/ds_node_udp_echo.js");
/// Node.js `udp6` client `HOST PORT COUNT SIZE`: each datagram retried until echoed intact
/// from HOST:PORT; prints `FROM <rinfo.address> <rinfo.port>` (first echo), `ECHOED
/// ok/count`.
const NODE_UDP_CLIENT: &str = include_str!("programs/ds_node_udp_client.js");
/// Python `create_server(("", PORT), family=AF_INET6, dualstack_ipv6=True)`; answers each
/// connection with `<sha> <n> <peer ip>`; prints `ADDR <repr(getsockname())>` and `CONN
/// <peer ip> <peer port> <repr(accepted getsockname())>`.
const PY_DUALSTACK_SERVER: &str = include_str!("programs/ds_py_dualstack_server.py");
/// A v6-only listener on PORT and an IPv4 one on PORT+1 in one process; checks the v6-only
/// one over `::1` and prints `ADDR6`, `ADDR4`, `LOCAL <sha sent> <sha echoed> <peer>
/// <repr(local)>`.
const PY_V6ONLY: &str = include_str!("programs/ds_py_v6only.py");
/// Java `new ServerSocket(PORT)` echo server (single-file source launch); prints `ADDR
/// <getInetAddress()> <getLocalPort()>` and `CONN <peer ip> <peer port> <local ip> <local
/// port>` (Java shows IPv4-mapped addresses as IPv4).
const JAVA_ECHO: &str = include_str!("programs/ds_java_echo.java");
/// Sends N random bytes to HOST PORT over IPv4, half-closes; prints `SENT <sha> <n>` and
/// `GOT <answer>`.
const SHA_CLIENT: &str = include_str!("programs/sha_client.py");
/// A plain IPv4 UDP client: COUNT random datagrams of SIZE bytes to HOST PORT, each retried
/// until the same bytes come back from HOST:PORT; prints `ECHOED ok/count`.
const UDP_CLIENT: &str = include_str!("programs/dpf_udp_client.py");

/// One test's lab and scratch directory (programs, payloads, logs; kept if the test fails).
struct Rig {
    dir: Scratch,
    lab: Lab,
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `node`, which must be installed (`scripts/install-deps` installs Debian's `nodejs`).
fn node() -> &'static str {
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "node is missing: run scripts/install-deps (package nodejs)"
    );
    "node"
}

/// `{ address, family, port }` of a Node.js `ADDR <json>` line.
fn node_addr(json: &str) -> (String, String, u16) {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("bad ADDR json {json:?}: {e}"));
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let port = v["port"].as_u64().and_then(|p| u16::try_from(p).ok());
    (
        s("address"),
        s("family"),
        port.unwrap_or_else(|| panic!("no port in {json:?}")),
    )
}

/// The python repr of a sockaddr_in6 tuple as this test writes it.
fn py_v6(ip: &str, port: u16) -> String {
    format!("('{ip}', {port}, 0, 0)")
}

/// The port of a python sockaddr_in6 repr `('IP', PORT, 0, 0)`.
fn py_port(repr: &str) -> u16 {
    repr.split(", ")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {repr:?}"))
}

/// The proxy the broker assigned to the `what` (`"tcp listener"`, `"udp socket"`) whose
/// local address has port `port` (whatever address the shim registered it with), waiting
/// up to `timeout`.
fn proxy_for_port(broker: &Broker, what: &str, port: u16, timeout: Duration) -> SocketAddrV4 {
    let line = wait_line(&broker.log, timeout, |l| registers(l, what, port)).unwrap_or_else(|| {
        panic!(
            "the broker registered no {what} with local port {port}; broker log:\n{}",
            broker.text()
        )
    });
    parse_after(&line, "-> proxy ")
}

/// True iff `line` is the broker's registration of a `what` with local port `port`.
fn registers(line: &str, what: &str, port: u16) -> bool {
    let needle = format!("registered {what} local ");
    line.split_once(&needle)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|local| local.ends_with(&format!(":{port}")))
}

impl Rig {
    fn up(tag: &str) -> Rig {
        for bin in ["gcb-brokerd", "gcb-portfwd", "libgcb.so"] {
            artifact(bin);
        }
        node();
        let lab = Lab::up();
        let dir = Scratch::new(&format!("ds-{tag}"), &lab);
        for (name, body) in [
            ("node_tcp_echo.js", NODE_TCP_ECHO),
            ("node_tcp_client.js", NODE_TCP_CLIENT),
            ("node_udp_echo.js", NODE_UDP_ECHO),
            ("node_udp_client.js", NODE_UDP_CLIENT),
            ("py_dualstack_server.py", PY_DUALSTACK_SERVER),
            ("py_v6only.py", PY_V6ONLY),
            ("ds_java_echo.java", JAVA_ECHO),
            ("sha_client.py", SHA_CLIENT),
            ("udp_client.py", UDP_CLIENT),
        ] {
            fs::write(dir.join(name), body).expect("write test program");
        }
        Rig { dir, lab }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The path of test program `name` as a string argument.
    fn prog(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn broker(&self) -> Broker {
        Broker::start(&self.lab, Host::P1, P1, true, &[], &self.path("broker.log"))
    }

    /// portfwd on gwa for 10.1.0.0/24, public ports PORTS.
    fn portfwd(&self) -> Portfwd {
        Portfwd::start(
            &self.lab,
            &self.dir,
            &["--private", "10.1.0.0/24", "--ports", PORTS],
        )
    }

    /// `prog` in `host`: under `gcb-run SHIM_OPTS --log debug --log-file NAME.shim.log` if
    /// `shim` is given, else plain.
    fn cmd(&self, host: Host, shim: Option<&[&str]>, name: &str, prog: &[&str]) -> Command {
        let mut cmd = match shim {
            Some(opts) => {
                let log = self.path(&format!("{name}.shim.log"));
                gcb_run(&self.lab, host, true, opts, Some(("debug", &log)))
            }
            None => self.lab.cmd(host, "env"),
        };
        cmd.args(prog);
        cmd
    }

    /// Starts a server (see [`Rig::cmd`]); stdout to NAME.out, stderr to NAME.err.
    fn serve(&self, host: Host, shim: Option<&[&str]>, name: &str, prog: &[&str]) -> Logged {
        self.lab
            .spawn_logged(&mut self.cmd(host, shim, name, prog), &self.dir, name)
    }

    /// Runs a client to completion (see [`Rig::cmd`]), stdin from `input` if given.
    fn run(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        name: &str,
        prog: &[&str],
        input: Option<&Path>,
    ) -> Output {
        let mut cmd = self.cmd(host, shim, name, prog);
        cmd.stdin(match input {
            Some(p) => Stdio::from(File::open(p).expect("open client input")),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        self.lab.spawn(&mut cmd).expect("spawn client").finish(RUN)
    }

    /// What server `s` printed after `prefix` on its first such line, waiting up to T;
    /// panics with its output and shim log if there is none.
    fn said(&self, s: &Logged, name: &str, prefix: &str) -> String {
        self.said_within(s, name, prefix, T)
    }

    /// [`Rig::said`] with another timeout (a JVM compiling its source takes longer).
    fn said_within(&self, s: &Logged, name: &str, prefix: &str, timeout: Duration) -> String {
        let line = wait_line(&s.out, timeout, |l| l.starts_with(prefix)).unwrap_or_else(|| {
            panic!(
                "{name} printed no {prefix:?} line; stdout:\n{}\nstderr:\n{}\nshim log:\n{}",
                read_text(&s.out),
                read_text(&s.err),
                read_text(&self.path(&format!("{name}.shim.log")))
            )
        });
        line[prefix.len()..].trim().to_owned()
    }

    /// Lines of server `s`'s stdout starting with `prefix`, without it.
    fn lines(&self, s: &Logged, prefix: &str) -> Vec<String> {
        read_text(&s.out)
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until server `s` printed `n` lines starting with `prefix`; returns them.
    fn wait_lines(&self, s: &Logged, prefix: &str, n: usize) -> Vec<String> {
        for _ in 0..100 {
            if self.lines(s, prefix).len() >= n {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.lines(s, prefix)
    }

    /// `ncat -4 IP PORT` from `from` with `n` random bytes on stdin (half-closed at EOF):
    /// Ok if exactly those bytes come back (an echo server).
    fn ncat_echo(&self, from: Host, ip: &str, port: u16, n: usize) -> Result<(), String> {
        let data = random_bytes(n);
        let input = self.path(&format!("ncat-{from}-{ip}-{port}.in"));
        fs::write(&input, &data).expect("write payload");
        let out = self.run(
            from,
            None,
            "ncat",
            &["ncat", "-4", "-w", "3", ip, &port.to_string()],
            Some(&input),
        );
        if sha256(&out.stdout) == sha256(&data) {
            Ok(())
        } else {
            Err(format!(
                "ncat {from} -> {ip}:{port}: sent {n} bytes, got {} back (status {:?}): {}",
                out.stdout.len(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The Node.js client in `host` (under `shim` if given) to HOST PORT with `n` bytes:
    /// asserts the echo is intact and returns its `LOCAL ...` line.
    fn node_client(
        &self,
        host: Host,
        shim: Option<&[&str]>,
        name: &str,
        to: (&str, u16),
        n: usize,
    ) -> String {
        let prog = self.prog("node_tcp_client.js");
        let out = self.run(
            host,
            shim,
            name,
            &[node(), &prog, to.0, &to.1.to_string(), &n.to_string()],
            None,
        );
        let o = text(&out);
        let field = |p: &str| o.lines().find_map(|l| l.strip_prefix(p)).map(str::to_owned);
        let log = read_text(&self.path(&format!("{name}.shim.log")));
        let sent =
            field("SENT ").unwrap_or_else(|| panic!("{name}: no echo: {o}\nshim log:\n{log}"));
        assert_eq!(
            field("ECHO ").as_deref(),
            Some(sent.as_str()),
            "{name} {host} -> {}:{}: the echo differs from what was sent: {o}",
            to.0,
            to.1
        );
        field("LOCAL ").unwrap_or_default()
    }

    /// The python sha client from `from` to IP PORT with `n` bytes: Ok(peer the server
    /// saw) if the server's sha256 and length match what was sent.
    fn sha_roundtrip(&self, from: Host, ip: &str, port: u16, n: usize) -> Result<String, String> {
        let prog = self.prog("sha_client.py");
        let out = self.run(
            from,
            None,
            "sha-client",
            &[python(), &prog, ip, &port.to_string(), &n.to_string()],
            None,
        );
        let o = text(&out);
        let sent = o.lines().find_map(|l| l.strip_prefix("SENT "));
        let got = o.lines().find_map(|l| l.strip_prefix("GOT "));
        match (sent, got) {
            (Some(sent), Some(got)) => {
                let mut g = got.split_whitespace();
                let have = format!("{} {}", g.next().unwrap_or(""), g.next().unwrap_or(""));
                if have == sent {
                    Ok(g.next().unwrap_or("").to_owned())
                } else {
                    Err(format!("sent {sent}, the server got {have}"))
                }
            }
            _ => Err(format!("{from} -> {ip}:{port} failed: {o}")),
        }
    }

    /// The python UDP client from `from` to IP PORT, `count` datagrams of 1200 bytes:
    /// how many came back intact from IP:PORT (0 when it could not send at all).
    fn udp_echoed(&self, from: Host, ip: &str, port: u16, count: u32) -> u32 {
        let prog = self.prog("udp_client.py");
        let out = self.run(
            from,
            None,
            "udp-client",
            &[
                python(),
                &prog,
                ip,
                &port.to_string(),
                &count.to_string(),
                "1200",
            ],
            None,
        );
        text(&out)
            .lines()
            .find_map(|l| l.strip_prefix("ECHOED "))
            .and_then(|r| r.split('/').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// `ss -Hltn sport = :PORT` in a1: the listeners' local addresses.
    fn tcp_listeners(&self, port: u16) -> String {
        let out = self.lab.run(
            Host::A1,
            "ss",
            ["-Hltn", "sport", "=", &format!(":{port}")],
            T,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

// ---------------------------------------------------------------------------------------
// 1. Node.js TCP
// ---------------------------------------------------------------------------------------

/// A Node.js TCP server (`listen(PORT)`, no host: `::`, dual-stack) in a1 under GCB is
/// registered: `server.address()` is the proxy as `::ffff:203.0.113.10`; a plain ncat on p2
/// and a Node.js client on b1 under GCB (to `::ffff:203.0.113.10` and to `203.0.113.10`)
/// get their bytes echoed intact; the server sees p2 as `::ffff:203.0.113.11`, and the
/// accepted connection's local address is the proxy the peer dialed.
#[test]
fn node_tcp_dualstack_server_is_reached_via_the_proxy_from_p2_and_b1() {
    let rig = Rig::up("node-tcp");
    let broker = rig.broker();
    let prog = rig.prog("node_tcp_echo.js");
    let gcb: &[&str] = &["--broker", P1];
    let server = rig.serve(Host::A1, Some(gcb), "node-echo", &[node(), &prog, "7100"]);
    let addr = rig.said(&server, "node-echo", "ADDR ");
    eprintln!("node server.address() under GCB: {addr}");
    let (ip, family, port) = node_addr(&addr);
    assert_eq!(
        (ip.as_str(), family.as_str()),
        (format!("::ffff:{P1}").as_str(), "IPv6"),
        "server.address() must be the proxy in the IPv4-mapped form: {addr}"
    );
    let proxy = proxy_for_port(&broker, "tcp listener", 7100, T);
    assert_eq!(proxy.ip().to_string(), P1);
    assert_eq!(
        port,
        proxy.port(),
        "server.address().port must be the proxy port the broker assigned"
    );

    // A plain IPv4 client on p2, 1 MiB through the proxy.
    rig.ncat_echo(Host::P2, P1, proxy.port(), MIB)
        .unwrap_or_else(|e| panic!("{e}\nbroker log:\n{}", broker.text()));
    let conns = rig.wait_lines(&server, "CONN ", 1);
    let first: Vec<&str> = conns[0].split_whitespace().collect();
    assert_eq!(
        first[0],
        format!("::ffff:{P2}"),
        "the server must see p2 as its peer, IPv4-mapped: {conns:?}"
    );
    assert_eq!(
        (first[2], first[3]),
        (
            format!("::ffff:{P1}").as_str(),
            proxy.port().to_string().as_str()
        ),
        "the accepted connection's local address must be the proxy p2 dialed: {conns:?}"
    );

    // A Node.js client on b1 under GCB, to the IPv4-mapped proxy and to the plain one.
    let mapped = format!("::ffff:{P1}");
    for (i, to) in [mapped.as_str(), P1].into_iter().enumerate() {
        let local = rig.node_client(
            Host::B1,
            Some(gcb),
            &format!("node-client-{i}"),
            (to, proxy.port()),
            MIB,
        );
        eprintln!("b1 node client to {to}: {local}");
    }
    let conns = rig.wait_lines(&server, "CONN ", 3);
    assert_eq!(conns.len(), 3, "three connections served: {conns:?}");
    for c in &conns[1..] {
        assert!(
            c.starts_with("::ffff:203.0.113.2 "),
            "the server sees b1 (its NAT's address), IPv4-mapped: {conns:?}"
        );
    }
}

/// Negative control: the same Node.js server without the shim listens on `::` with its own
/// port and serves a2, but p2 reaches it neither at gwa's public address nor at a1's.
#[test]
fn node_tcp_server_without_the_shim_is_unreachable_from_p2() {
    let rig = Rig::up("node-tcp-neg");
    let prog = rig.prog("node_tcp_echo.js");
    let server = rig.serve(Host::A1, None, "node-echo", &[node(), &prog, "7100"]);
    let addr = rig.said(&server, "node-echo", "ADDR ");
    assert_eq!(node_addr(&addr), ("::".to_owned(), "IPv6".to_owned(), 7100));
    rig.ncat_echo(Host::A2, A1, 7100, MIB)
        .expect("a2 must reach the server on the LAN");
    let conns = rig.wait_lines(&server, "CONN ", 1);
    assert!(conns[0].starts_with("::ffff:10.1.0.12 "), "{conns:?}");
    for ip in [GWA, A1] {
        assert!(
            !rig.lab.tcp_connects(Host::P2, ip, 7100),
            "p2 must not reach the server at {ip}:7100 without the shim"
        );
        assert!(rig.ncat_echo(Host::P2, ip, 7100, 1000).is_err());
    }
    assert_eq!(rig.lines(&server, "CONN ").len(), 1, "only a2 got through");
}

// ---------------------------------------------------------------------------------------
// 2. Node.js UDP
// ---------------------------------------------------------------------------------------

/// A Node.js `udp6` socket bound to PORT (`::`, dual-stack) in a1 under GCB is registered:
/// `socket.address()` is the proxy as `::ffff:203.0.113.10`; a plain UDP client on p2 gets
/// every datagram echoed intact from the proxy, and the server's `rinfo.address` is
/// `::ffff:203.0.113.11`.
#[test]
fn node_udp6_echo_is_reached_via_the_proxy_from_p2() {
    let rig = Rig::up("node-udp");
    let broker = rig.broker();
    let prog = rig.prog("node_udp_echo.js");
    let gcb: &[&str] = &["--broker", P1];
    let server = rig.serve(
        Host::A1,
        Some(gcb),
        "node-udp-echo",
        &[node(), &prog, "7200"],
    );
    let addr = rig.said(&server, "node-udp-echo", "ADDR ");
    eprintln!("node udp6 socket.address() under GCB: {addr}");
    let (ip, family, port) = node_addr(&addr);
    assert_eq!(
        (ip.as_str(), family.as_str()),
        (format!("::ffff:{P1}").as_str(), "IPv6"),
        "socket.address() must be the proxy in the IPv4-mapped form: {addr}"
    );
    let proxy = proxy_for_port(&broker, "udp socket", 7200, T);
    assert_eq!(proxy.ip().to_string(), P1);
    assert_eq!(
        port,
        proxy.port(),
        "socket.address().port is the proxy port"
    );

    let echoed = rig.udp_echoed(Host::P2, P1, proxy.port(), 8);
    assert_eq!(
        echoed,
        8,
        "p2 -> proxy {proxy}: datagrams echoed intact\nserver: {}\nbroker log:\n{}",
        read_text(&server.out),
        broker.text()
    );
    let from = rig.lines(&server, "FROM ");
    assert!(from.len() >= 8, "{from:?}");
    for l in &from {
        assert!(
            l.starts_with(&format!("::ffff:{P2} ")),
            "rinfo.address must be p2, IPv4-mapped: {l}"
        );
    }

    // A Node.js udp6 client on b1 under GCB, sending to the IPv4-mapped proxy.
    let client = rig.prog("node_udp_client.js");
    let to = format!("::ffff:{P1}");
    let port = proxy.port().to_string();
    let out = rig.run(
        Host::B1,
        Some(gcb),
        "node-udp-client",
        &[node(), &client, &to, &port, "8", "1200"],
        None,
    );
    let o = text(&out);
    assert!(
        o.contains("ECHOED 8/8"),
        "b1 udp6 client -> {to} {port}: {o}\nshim log:\n{}",
        read_text(&rig.path("node-udp-client.shim.log"))
    );
    assert!(
        o.contains(&format!("FROM {to} {port}")),
        "the echo comes from the proxy, IPv4-mapped: {o}"
    );
}

/// Negative control: the same Node.js `udp6` server without the shim echoes for a2, but
/// nothing p2 sends to gwa's public address or a1's comes back.
#[test]
fn node_udp6_echo_without_the_shim_is_unreachable_from_p2() {
    let rig = Rig::up("node-udp-neg");
    let prog = rig.prog("node_udp_echo.js");
    let server = rig.serve(Host::A1, None, "node-udp-echo", &[node(), &prog, "7200"]);
    let addr = rig.said(&server, "node-udp-echo", "ADDR ");
    assert_eq!(node_addr(&addr), ("::".to_owned(), "IPv6".to_owned(), 7200));
    assert_eq!(rig.udp_echoed(Host::A2, A1, 7200, 3), 3, "a2 on the LAN");
    let from = rig.lines(&server, "FROM ");
    assert!(
        from.iter().all(|l| l.starts_with("::ffff:10.1.0.12 ")),
        "{from:?}"
    );
    for ip in [GWA, A1] {
        assert_eq!(rig.udp_echoed(Host::P2, ip, 7200, 3), 0, "p2 -> {ip}:7200");
    }
    assert_eq!(
        rig.lines(&server, "FROM ").len(),
        from.len(),
        "p2 got nothing in"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Python create_server(dualstack_ipv6=True)
// ---------------------------------------------------------------------------------------

/// Python's dual-stack `create_server` in a1 under GCB: `getsockname()` is
/// `('::ffff:203.0.113.10', PROXYPORT, 0, 0)`; p2 reaches it through the proxy with every
/// byte counted; the server sees p2 as `::ffff:203.0.113.11` and the accepted socket's
/// `getsockname()` is the proxy.
#[test]
fn python_dualstack_create_server_is_reached_via_the_gcb_proxy() {
    let rig = Rig::up("py-gcb");
    let broker = rig.broker();
    let prog = rig.prog("py_dualstack_server.py");
    let gcb: &[&str] = &["--broker", P1];
    let server = rig.serve(
        Host::A1,
        Some(gcb),
        "py-ds",
        &[python(), "-u", &prog, "7300"],
    );
    let addr = rig.said(&server, "py-ds", "ADDR ");
    eprintln!("python dual-stack getsockname() under GCB: {addr}");
    assert!(
        addr.starts_with(&format!("('::ffff:{P1}', ")),
        "getsockname() must be the proxy, IPv4-mapped: {addr}"
    );
    let proxy = proxy_for_port(&broker, "tcp listener", 7300, T);
    assert_eq!(addr, py_v6(&format!("::ffff:{}", proxy.ip()), proxy.port()));

    let peer = rig
        .sha_roundtrip(Host::P2, P1, proxy.port(), MIB)
        .unwrap_or_else(|e| panic!("{e}\nbroker log:\n{}", broker.text()));
    assert_eq!(peer, format!("::ffff:{P2}"), "accept()'s peer");
    let conns = rig.wait_lines(&server, "CONN ", 1);
    assert!(
        conns[0].ends_with(&py_v6(&format!("::ffff:{P1}"), proxy.port())),
        "the accepted socket's getsockname() must be the proxy p2 dialed: {conns:?}"
    );
}

/// The same Python server under DPF (portfwd on gwa): `getsockname()` is
/// `('::ffff:203.0.113.1', PUBLICPORT, 0, 0)`, gwa forwards PUBLICPORT to a1's port, and
/// p2 reaches it at 203.0.113.1:PUBLICPORT; the accepted socket's `getsockname()` is the
/// public mapping.
#[test]
fn python_dualstack_create_server_is_reached_via_dpf() {
    let rig = Rig::up("py-dpf");
    let _portfwd = rig.portfwd();
    let prog = rig.prog("py_dualstack_server.py");
    let dpf: &[&str] = &["--dpf", "10.1.0.1"];
    let server = rig.serve(
        Host::A1,
        Some(dpf),
        "py-ds",
        &[python(), "-u", &prog, "7300"],
    );
    let addr = rig.said(&server, "py-ds", "ADDR ");
    eprintln!("python dual-stack getsockname() under DPF: {addr}");
    assert!(
        addr.starts_with(&format!("('::ffff:{GWA}', ")),
        "getsockname() must be the public mapping, IPv4-mapped: {addr}"
    );
    let public = py_port(&addr);
    assert!((20000..=29999).contains(&public), "public port {public}");
    let maps = portfwd_maps(&rig.lab);
    assert!(
        maps.contains(&format!("{public} : {A1} . 7300")),
        "gwa must forward {public} to {A1}:7300:\n{maps}"
    );

    let peer = rig
        .sha_roundtrip(Host::P2, GWA, public, MIB)
        .unwrap_or_else(|e| panic!("p2 -> {GWA}:{public}: {e}"));
    assert_eq!(peer, format!("::ffff:{P2}"), "accept()'s peer");
    let conns = rig.wait_lines(&server, "CONN ", 1);
    assert!(
        conns[0].ends_with(&py_v6(&format!("::ffff:{GWA}"), public)),
        "the accepted socket's getsockname() must be the public mapping p2 dialed: {conns:?}"
    );
}

/// Negative control for both: without the shim (portfwd running on gwa) the Python server
/// reports `('::', 7300, 0, 0)`, serves a2, gets no mapping, and p2 reaches it neither at
/// gwa's public address nor at a1's.
#[test]
fn python_dualstack_create_server_without_the_shim_is_unreachable_from_p2() {
    let rig = Rig::up("py-neg");
    let _portfwd = rig.portfwd();
    let prog = rig.prog("py_dualstack_server.py");
    let server = rig.serve(Host::A1, None, "py-ds", &[python(), "-u", &prog, "7300"]);
    assert_eq!(rig.said(&server, "py-ds", "ADDR "), py_v6("::", 7300));
    assert_eq!(
        rig.sha_roundtrip(Host::A2, A1, 7300, 100_000).as_deref(),
        Ok("::ffff:10.1.0.12"),
        "a2 on the LAN"
    );
    let maps = portfwd_maps(&rig.lab);
    assert!(
        !maps.contains(" : 10."),
        "no mapping without the shim:\n{maps}"
    );
    for ip in [GWA, A1] {
        assert!(
            rig.sha_roundtrip(Host::P2, ip, 7300, 1000).is_err(),
            "p2 must not reach {ip}:7300 without the shim"
        );
    }
    assert_eq!(rig.lines(&server, "CONN ").len(), 1, "only a2 got through");
}

// ---------------------------------------------------------------------------------------
// 4. v6-only sockets are left alone
// ---------------------------------------------------------------------------------------

/// A v6-only listener (IPV6_V6ONLY=1 on `::`) under GCB is not managed: `getsockname()` is
/// its real address `('::', PORT, 0, 0)`, the broker registers nothing for it, and it
/// serves over `::1` with the bytes intact (the accepted socket's address is the real
/// `::1`). The IPv4 listener in the same process is registered (so the shim is active and
/// the absence of a registration means something).
#[test]
fn v6only_socket_under_the_shim_is_left_alone_and_works_locally() {
    let rig = Rig::up("v6only");
    let broker = rig.broker();
    let prog = rig.prog("py_v6only.py");
    let gcb: &[&str] = &["--broker", P1];
    let server = rig.serve(
        Host::A1,
        Some(gcb),
        "v6only",
        &[python(), "-u", &prog, "7400"],
    );
    assert_eq!(rig.said(&server, "v6only", "ADDR6 "), py_v6("::", 7400));
    let v4 = rig.said(&server, "v6only", "ADDR4 ");
    let proxy = proxy_for_port(&broker, "tcp listener", 7401, T);
    assert_eq!(
        v4,
        proxy.to_string(),
        "the IPv4 listener next to it is registered"
    );
    let local = rig.said(&server, "v6only", "LOCAL ");
    let f: Vec<&str> = local.splitn(4, ' ').collect();
    assert_eq!(f.len(), 4, "{local}");
    assert_eq!(f[0], f[1], "the echo over ::1 differs from what was sent");
    assert_eq!(f[2], "::1", "the v6-only listener's peer");
    assert_eq!(
        f[3],
        py_v6("::1", 7400),
        "the accepted socket's real address"
    );
    assert!(
        rig.tcp_listeners(7400).contains("[::]:7400"),
        "ss shows the v6-only listener on its real port: {:?}",
        rig.tcp_listeners(7400)
    );
    // Give a late (AEH) registration time to show up, then check there is none.
    thread::sleep(Duration::from_secs(2));
    let log = broker.text();
    assert!(
        !log.lines().any(|l| registers(l, "tcp listener", 7400)),
        "the v6-only listener must not be registered:\n{log}"
    );
    assert_eq!(
        log.matches("registered tcp listener").count(),
        1,
        "one registration (the IPv4 listener):\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// Java ServerSocket (dual-stack by default)
// ---------------------------------------------------------------------------------------

/// `java` (a JDK: the single-file source launcher needs its compiler), which must exist.
fn java() -> &'static str {
    let ok = Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "java is missing: install a JDK (e.g. openjdk-17-jdk-headless)"
    );
    "java"
}

/// A JVM compiles and starts its program slowly.
const JVM_UP: Duration = Duration::from_secs(40);

/// Java's `new ServerSocket(PORT)` (dual-stack `::`) in a1 under GCB is registered, and a
/// plain ncat on p2 gets 1 MiB echoed intact through the proxy; the server sees p2 as the
/// peer (Java shows `::ffff:203.0.113.11` as IPv4) and the proxy as the accepted socket's
/// local address. Not asserted: the ServerSocket's own `getInetAddress()`/`getLocalPort()`.
/// Java reads them once, in `bind()`, before `listen()` registers the socket, so they stay
/// the bind address and port (`0.0.0.0 7500`), as for an IPv4 ServerSocket under GCB.
#[test]
fn java_serversocket_is_reached_via_the_proxy_from_p2() {
    let rig = Rig::up("java");
    let broker = rig.broker();
    let prog = rig.prog("ds_java_echo.java");
    let gcb: &[&str] = &["--broker", P1];
    let server = rig.serve(Host::A1, Some(gcb), "java-echo", &[java(), &prog, "7500"]);
    let addr = rig.said_within(&server, "java-echo", "ADDR ", JVM_UP);
    eprintln!("java ServerSocket under GCB (read by Java at bind): {addr}");
    let proxy = proxy_for_port(&broker, "tcp listener", 7500, T);
    assert_eq!(proxy.ip().to_string(), P1);
    rig.ncat_echo(Host::P2, P1, proxy.port(), MIB)
        .unwrap_or_else(|e| panic!("{e}\nbroker log:\n{}", broker.text()));
    let conns = rig.wait_lines(&server, "CONN ", 1);
    let f: Vec<&str> = conns[0].split_whitespace().collect();
    assert_eq!(f[0], P2, "the peer is p2: {conns:?}");
    assert_eq!(
        (f[2], f[3]),
        (P1, proxy.port().to_string().as_str()),
        "the accepted socket's local address is the proxy p2 dialed: {conns:?}"
    );
}

/// Negative control: the same Java server without the shim listens on its own port,
/// serves a2, and is unreachable from p2.
#[test]
fn java_serversocket_without_the_shim_is_unreachable_from_p2() {
    let rig = Rig::up("java-neg");
    let prog = rig.prog("ds_java_echo.java");
    let server = rig.serve(Host::A1, None, "java-echo", &[java(), &prog, "7500"]);
    let addr = rig.said_within(&server, "java-echo", "ADDR ", JVM_UP);
    assert!(addr.ends_with(" 7500"), "{addr}");
    assert!(
        rig.tcp_listeners(7500).contains("*:7500"),
        "java listens dual-stack (ss shows *:7500): {:?}",
        rig.tcp_listeners(7500)
    );
    rig.ncat_echo(Host::A2, A1, 7500, MIB)
        .expect("a2 must reach the server on the LAN");
    for ip in [GWA, A1] {
        assert!(
            !rig.lab.tcp_connects(Host::P2, ip, 7500),
            "p2 must not reach the server at {ip}:7500 without the shim"
        );
    }
    assert_eq!(
        rig.wait_lines(&server, "CONN ", 1).len(),
        1,
        "only a2 got through"
    );
}
