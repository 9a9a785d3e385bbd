//! A deployable broker (issue 13, item 1): `gcb-brokerd` on a host that reaches the public
//! segment only through a 1:1 NAT (c1 behind gwc, [`Lab::nat1to1`]), as on a cloud VM
//! whose public IP no interface holds. It binds the wildcard and advertises the public IP
//! (`--bind 0.0.0.0 --advertise 203.0.113.20`), and takes proxy ports from
//! `--proxy-ports` (a firewall's range). Unmodified programs (python http.server, curl,
//! a python UDP echo) under `gcb-run` in a1; plain and GCB clients in p1 and b1; every
//! byte checked by sha256.
//!
//! The same for DPF: `gcb-portfwd` on c1 as the NAT gateway of d1, its rules matching
//! c1's WAN address (`--public 10.3.0.11`, where packets arrive), clients told the
//! public IP (`--advertise 203.0.113.20`).
//!
//! Before `--bind`/`--advertise` the broker could not start there at all: `--listen
//! 203.0.113.20` fails with EADDRNOTAVAIL (the first test checks that it still does, with
//! a message naming the address) and `--listen 0.0.0.0` was refused.

use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gcb_lab::{
    brokerd, gcb_run, libgcb, portfwd_bin, python, random_bytes, read_text as read, sha256,
    wait_line, Broker, Host, Lab, Proc, Scratch, NAT1TO1_PUBLIC,
};

const PUBLIC: &str = "203.0.113.20";
const BROKER: &str = "203.0.113.20:9650";
const A1: &str = "10.1.0.11";
/// Generous bound for one client run.
const RUN: Duration = Duration::from_secs(30);
/// Time for a server to come up and register.
const UP: Duration = Duration::from_secs(10);

const UDP_ECHO: &str = include_str!("programs/udp_echo.py");
const UDP_CLIENT: &str = include_str!("programs/udp_client.py");

struct Rig {
    dir: Scratch,
    lab: Lab,
}

struct Started {
    proc: Proc,
    out: PathBuf,
    err: PathBuf,
}

impl Rig {
    /// A lab with c1 behind the 1:1 NAT, and a scratch directory with `www/`.
    fn up() -> Rig {
        brokerd();
        libgcb();
        let lab = Lab::up();
        lab.nat1to1();
        let dir = Scratch::new("deploy", &lab);
        fs::create_dir_all(dir.join("www")).expect("create scratch dir");
        fs::write(dir.join("echo.py"), UDP_ECHO).unwrap();
        fs::write(dir.join("client.py"), UDP_CLIENT).unwrap();
        Rig { dir, lab }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The broker on c1, bound on the wildcard, advertising the public IP.
    fn broker(&self, extra: &[&str]) -> Broker {
        let mut args = vec!["--bind", "0.0.0.0", "--advertise", PUBLIC, "--log", "debug"];
        args.extend_from_slice(extra);
        let b = Broker::start_with(&self.lab, Host::C1, true, &args, &self.path("broker.log"));
        self.lab
            .wait_for_udp_bind(Host::C1, 9650, UP)
            .unwrap_or_else(|e| panic!("broker not up: {e}\n{}", b.text()));
        b
    }

    /// `gcb-run --broker PUBLIC:9650 --log LEVEL --log-file TAG.shim.log -- program`.
    fn gcb(&self, host: Host, level: &str, tag: &str, program: &str) -> Command {
        let log = self.path(&format!("{tag}.shim.log"));
        let mut c = gcb_run(
            &self.lab,
            host,
            true,
            &["--broker", BROKER],
            Some((level, &log)),
        );
        c.arg(program);
        c
    }

    fn start(&self, cmd: &mut Command, tag: &str) -> Started {
        let out = self.path(&format!("{tag}.out"));
        let err = self.path(&format!("{tag}.err"));
        cmd.stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap());
        let proc = self
            .lab
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("spawn {tag}: {e}"));
        Started { proc, out, err }
    }

    fn output(&self, cmd: &mut Command) -> Output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.lab.spawn(cmd).expect("spawn client").finish(RUN)
    }

    /// python http.server on `port` in a1 under gcb-run (shim log at `level`); returns it
    /// and the address it printed (its getsockname()).
    fn http_server(&self, port: u16, level: &str, tag: &str) -> (Started, String) {
        let mut cmd = self.gcb(Host::A1, level, tag, python());
        cmd.args([
            "-u",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "0.0.0.0",
        ])
        .current_dir(self.path("www"));
        let s = self.start(&mut cmd, tag);
        let line =
            wait_line(&s.out, UP, |l| l.starts_with("Serving HTTP on ")).unwrap_or_else(|| {
                panic!(
                    "http.server {tag} did not start: {:?} {:?}",
                    read(&s.out),
                    read(&s.err)
                )
            });
        // "Serving HTTP on 203.0.113.20 port 40000 (http://...) ..."
        let w: Vec<&str> = line.split_whitespace().collect();
        (s, format!("{}:{}", w[3], w[5]))
    }

    /// `curl http://ADDR/FILE` in `host` (plain, or under gcb-run when `gcb_tag`); panics
    /// unless it succeeds; returns the body.
    fn curl(&self, host: Host, gcb_tag: Option<&str>, addr: &str, file: &str) -> Vec<u8> {
        let mut cmd = match gcb_tag {
            Some(tag) => self.gcb(host, "debug", tag, "curl"),
            None => self.lab.cmd(host, "curl"),
        };
        let url = format!("http://{addr}/{file}");
        cmd.args(["-sS", "--max-time", "25", &url]);
        let out = self.output(&mut cmd);
        assert!(
            out.status.success(),
            "curl {url} from {host} failed: {:?}\nstderr: {}\nbroker log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            read(&self.path("broker.log"))
        );
        out.stdout
    }

    /// Random bytes at `www/NAME`; their sha256.
    fn payload(&self, name: &str, n: usize) -> String {
        let data = random_bytes(n);
        fs::write(self.path(&format!("www/{name}")), &data).unwrap();
        sha256(&data)
    }
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddrV4>()
        .unwrap_or_else(|e| panic!("{addr:?}: {e}"))
        .port()
}

fn count(path: &Path, pred: impl Fn(&str) -> bool) -> usize {
    read(path).lines().filter(|l| pred(l)).count()
}

/// The broker on the 1:1-NATed host: a TCP server and a UDP server in a1 register, get
/// proxies ADVERTISE:PORT with PORT in --proxy-ports (what their getsockname() reports),
/// and plain clients on p1 (public) and in b1 (another private network), and a GCB client
/// in b1 (relayed through the advertised relay port), reach them with every byte intact.
#[test]
fn broker_behind_one_to_one_nat_binds_wildcard_and_advertises_public_ip() {
    let rig = Rig::up();
    // What an operator tried before: the public IP is on no interface of c1.
    let mut old = rig.lab.cmd(Host::C1, brokerd());
    old.args(["--listen", PUBLIC]);
    let out = rig.output(&mut old);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(PUBLIC),
        "--listen on an address no interface holds must fail naming it: {out:?}"
    );
    // --bind 0.0.0.0 alone cannot be told to clients.
    let mut wild = rig.lab.cmd(Host::C1, brokerd());
    wild.args(["--bind", "0.0.0.0"]);
    let out = rig.output(&mut wild);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--advertise"),
        "--bind 0.0.0.0 without --advertise must fail saying so: {out:?}"
    );

    let broker = rig.broker(&["--proxy-ports", "40000-40009"]);
    assert!(
        broker
            .text()
            .contains("advertised as 203.0.113.20:9650 (reached from here via 10.3.0.11)"),
        "{}",
        broker.text()
    );
    let sha = rig.payload("f.bin", 3 << 20);

    let (http, advertised) = rig.http_server(8000, "debug", "http");
    let proxy = broker.proxy_of("tcp listener", &format!("{A1}:8000"), UP);
    assert_eq!(
        advertised,
        proxy.to_string(),
        "getsockname() reports the proxy"
    );
    assert_eq!(
        *proxy.ip(),
        NAT1TO1_PUBLIC,
        "the proxy is on the advertised IP"
    );
    assert!(
        (40000..=40009).contains(&proxy.port()),
        "proxy port {} outside --proxy-ports",
        proxy.port()
    );
    // The proxy socket really is bound on c1's wildcard at that port.
    rig.lab
        .wait_for_tcp_listen(Host::C1, proxy.port(), UP)
        .expect("proxy listener on c1");

    for (host, tag) in [
        (Host::P1, None),
        (Host::B1, None),
        (Host::B1, Some("b1curl")),
    ] {
        let body = rig.curl(host, tag, &advertised, "f.bin");
        assert_eq!(
            sha256(&body),
            sha,
            "{host} ({}) -> {advertised}: {} bytes, sha256 differs",
            if tag.is_some() { "GCB" } else { "plain" },
            body.len()
        );
    }
    // The GCB client in b1 went through the relay port at the advertised address: relayed,
    // or a TCP punch whose leg is there (it falls back to the relay: gwb and gwc answer
    // unsolicited SYNs with resets).
    let b1log = read(&rig.path("b1curl.shim.log"));
    assert!(
        (b1log.contains("Relay {") || b1log.contains("Punch {")) && b1log.contains(BROKER),
        "the GCB client in b1 should be relayed via {BROKER}:\n{b1log}"
    );
    assert!(
        broker.text().contains("relay started"),
        "no relay in the broker log:\n{}",
        broker.text()
    );
    assert_eq!(
        count(&http.err, |l| l.contains("GET /f.bin")),
        3,
        "http.server served three requests:\n{}",
        read(&http.err)
    );

    // UDP: the echo server in a1 registers a UDP proxy in the range; a plain client on p1
    // sends through it and gets its datagrams back intact, from the proxy address.
    let mut echo_cmd = rig.gcb(Host::A1, "debug", "echo", python());
    echo_cmd.arg("-u").arg(rig.path("echo.py")).arg("9000");
    let echo = rig.start(&mut echo_cmd, "echo");
    let line = wait_line(&echo.out, UP, |l| l.starts_with("ADDR ")).expect("echo ADDR");
    let uproxy = line["ADDR ".len()..].trim().to_owned();
    assert!(
        uproxy.starts_with(&format!("{PUBLIC}:")),
        "udp proxy {uproxy}"
    );
    assert!(
        (40000..=40009).contains(&port_of(&uproxy)),
        "udp proxy {uproxy} outside --proxy-ports"
    );
    let mut client = rig.lab.cmd(Host::P1, python());
    client
        .arg("-u")
        .arg(rig.path("client.py"))
        .args(["echo", &uproxy, "ADDR", "100", "1200", "5000"]);
    let out = rig.output(&mut client);
    let text = String::from_utf8_lossy(&out.stdout);
    let echoes: Vec<&str> = text.lines().filter(|l| l.starts_with("ECHO ")).collect();
    assert_eq!(echoes.len(), 3, "udp echo from p1 via {uproxy}:\n{text}");
    for l in echoes {
        // ECHO N SENT_SHA BACK_SHA FROM SEEN TAG RTT
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f[2], f[3], "datagram changed: {l}");
        assert_eq!(f[4], uproxy, "reply not from the proxy: {l}");
        assert!(
            f[5].starts_with("203.0.113.10:"),
            "the server saw another peer: {l}"
        );
    }
    drop(echo.proc);
    drop(http.proc);
}

/// --proxy-ports with 2 ports and 3 listeners: the third registration is refused with
/// `port_range`; its server still serves locally, its shim logs one line naming the
/// range, the broker one warning; once a port frees, the third registers on it.
#[test]
fn exhausted_proxy_port_range_refuses_then_recovers() {
    let rig = Rig::up();
    let broker = rig.broker(&[
        "--proxy-ports",
        "40100-40101",
        "--lease-ms",
        "4000",
        "--proxy-reserve-secs",
        "1",
    ]);
    let sha = rig.payload("g.bin", 1 << 20);
    let (first, addr1) = rig.http_server(8001, "warn", "h1");
    let (_second, addr2) = rig.http_server(8002, "warn", "h2");
    let ports = [port_of(&addr1), port_of(&addr2)];
    for a in [&addr1, &addr2] {
        assert!(a.starts_with(&format!("{PUBLIC}:")), "{a}");
    }
    assert!(
        ports.contains(&40100) && ports.contains(&40101),
        "two listeners take the two ports: {addr1} {addr2}"
    );

    let (third, addr3) = rig.http_server(8003, "warn", "h3");
    assert_eq!(
        addr3, "0.0.0.0:8003",
        "without a registration the server reports its own address"
    );
    // It serves locally meanwhile (a2 on its LAN).
    let body = rig.curl(Host::A2, None, &format!("{A1}:8003"), "g.bin");
    assert_eq!(sha256(&body), sha, "a2 -> a1:8003 locally");
    let shim_log = rig.path("h3.shim.log");
    let lines: Vec<String> = read(&shim_log)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one shim line expected:\n{}",
        read(&shim_log)
    );
    assert!(
        lines[0].contains("PortRange") && lines[0].contains("40100-40101"),
        "the shim line should give the refusal and the range: {}",
        lines[0]
    );
    let warns = broker
        .text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("40100-40101") && l.contains("exhausted"))
        .count();
    assert_eq!(
        warns,
        1,
        "one broker warning naming the range:\n{}",
        broker.text()
    );

    // The first server goes: its registration lapses with the lease, its port stays
    // reserved for it a second, then the third server's retry gets it.
    let freed = port_of(&addr1);
    drop(first.proc);
    let line = wait_line(&broker.log, Duration::from_secs(90), |l| {
        l.contains(&format!("registered tcp listener local {A1}:8003 "))
    })
    .unwrap_or_else(|| panic!("the third listener never registered:\n{}", broker.text()));
    let proxy3 = gcb_lab::parse_after(&line, "-> proxy ");
    assert_eq!(
        proxy3.port(),
        freed,
        "the third gets the freed port: {line}"
    );
    let body = rig.curl(Host::P1, None, &proxy3.to_string(), "g.bin");
    assert_eq!(sha256(&body), sha, "p1 -> third server via {proxy3}");
    drop(third.proc);
}

/// DPF on a gateway whose public IP is 1:1-NATed: portfwd on c1 (the gateway of d1)
/// with `--public` its WAN address and `--advertise` the public IP. A server in d1 under
/// gcb-run reports ADVERTISE:PORT (getsockname), the rule on c1 matches the WAN address,
/// and plain clients on p1 and in b1 download through it intact.
#[test]
fn portfwd_behind_one_to_one_nat_advertises_the_public_ip() {
    let rig = Rig::up();
    let log = rig.path("portfwd.log");
    let mut cmd = rig.lab.cmd(Host::C1, portfwd_bin());
    cmd.arg("--admin-socket").arg(rig.path("portfwd.sock"));
    cmd.args([
        "--public",
        "10.3.0.11",
        "--advertise",
        PUBLIC,
        "--private",
        "10.4.0.0/24",
        "--ports",
        "20000-20099",
        "--listen",
        "10.4.0.1",
        "--probe-timeout-ms",
        "500",
        "--state",
    ])
    .arg(rig.path("pf-state"))
    .stdout(File::create(&log).unwrap())
    .stderr(File::create(rig.path("portfwd.err")).unwrap());
    let _portfwd = rig.lab.spawn(&mut cmd).expect("spawn gcb-portfwd");
    rig.lab
        .wait_for_udp_bind(Host::C1, 9651, UP)
        .unwrap_or_else(|e| panic!("portfwd not up: {e}\n{}", read(&rig.path("portfwd.err"))));

    let sha = rig.payload("d.bin", 2 << 20);
    let shim_log = rig.path("d1http.shim.log");
    let mut http = gcb_run(
        &rig.lab,
        Host::D1,
        true,
        &["--dpf", "10.4.0.1"],
        Some(("debug", &shim_log)),
    );
    http.arg(python())
        .args(["-u", "-m", "http.server", "8000", "--bind", "0.0.0.0"])
        .current_dir(rig.path("www"));
    let server = rig.start(&mut http, "d1http");
    let line = wait_line(&server.out, UP, |l| l.starts_with("Serving HTTP on "))
        .unwrap_or_else(|| panic!("no server: {:?} {}", read(&server.err), read(&shim_log)));
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        w[3], PUBLIC,
        "getsockname() reports the advertised IP: {line}"
    );
    let port: u16 = w[5].parse().unwrap();
    assert!((20000..=20099).contains(&port), "{line}");
    // The rule matches the address packets really arrive to (c1's WAN address).
    let out = rig.output(
        rig.lab
            .cmd(Host::C1, "nft")
            .args(["list", "table", "ip", "gcb_portfwd"]),
    );
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(
        rules.contains("ip daddr 10.3.0.11 ")
            && rules.contains(&format!("{port} : 10.4.0.11 . 8000")),
        "portfwd's table on c1:\n{rules}"
    );
    for host in [Host::P1, Host::B1] {
        let body = rig.curl(host, None, &format!("{PUBLIC}:{port}"), "d.bin");
        assert_eq!(sha256(&body), sha, "{host} -> {PUBLIC}:{port}");
    }
    drop(server.proc);
}
