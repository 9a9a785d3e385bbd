//! DPF through the shim, in the lab: the real `gcb-portfwd` on gwa, unmodified servers in
//! a1 under `scripts/gcb-run --dpf 10.1.0.1` (ncat, python http.server, iperf3, socat, small
//! python servers), clients on the public segment and in a2. Issue 4, "Shown in the lab",
//! from the shim's side (the daemon's side is tests/dpf_portfwd.rs). Every transfer is
//! checked end to end with sha256. Needs root; never skips. Build first:
//! `cargo build --release --workspace`.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use gcb_lab::{
    artifact, gcb_run, portfwd_maps, python, random_bytes, sha256, wait_line_containing,
    wait_until, Broker, Host, Lab, Portfwd, Proc, Scratch,
};

const T: Duration = Duration::from_secs(10);
const PROBE_SECS: u64 = 2;
const PUBLIC: &str = "203.0.113.1";
/// portfwd's public port range.
const PORTS: &str = "20000-29999";
const BROKER: &str = "203.0.113.10";

/// A TCP server: each connection is read to EOF and answered with
/// `<sha256> <bytes> <peer ip>`; prints `ADDR ip:port` (getsockname) once listening.
const SHA_SERVER: &str = include_str!("programs/dpf_sha_server.py");

/// Sends N random bytes to HOST:PORT, half-closes, prints `SENT <sha256> <n>` and
/// `GOT <answer>`.
const SHA_CLIENT: &str = include_str!("programs/sha_client.py");

/// A UDP echo server; prints `ADDR ip:port` (getsockname) once bound.
const UDP_ECHO: &str = include_str!("programs/dpf_udp_echo.py");

/// Sends COUNT random datagrams of SIZE bytes to HOST:PORT, each retried until an echo
/// with the same sha256 comes back from HOST:PORT; prints `ECHOED ok/count`.
const UDP_CLIENT: &str = include_str!("programs/dpf_udp_client.py");

/// Binds the sockets named on the command line (`tcp:PORT` / `udp:PORT`, optionally
/// `tcp:IP:PORT`) one after the other and reports each: `tcp PORT OK ip:port` (getsockname
/// after listen) or `tcp PORT ERR errno` (of bind, listen or getsockname). TCP listeners answer like SHA_SERVER. Prints
/// `READY`, then on a line on stdin (not at EOF) closes every socket and prints `CLOSED`.
const BINDER: &str = include_str!("programs/dpf_binder.py");

/// A UDP client on an ephemeral port, as clients are written: `bind(("", 0))`, then COUNT
/// random datagrams of SIZE bytes to HOST:PORT (unconnected sendto), each retried until an
/// echo with the same sha256 comes back from HOST:PORT; prints `ECHOED ok/count`, then
/// waits for the file GO before closing (so the test can look at the gateway meanwhile).
const EPHEMERAL_UDP_CLIENT: &str = include_str!("programs/dpf_ephemeral_udp_client.py");

/// A TCP server on an ephemeral port that does not ask its address until told: bind port
/// 0, listen, print `LISTENING`, wait for the file argv[1], then print `ADDR ip:port`
/// (getsockname) and answer connections like SHA_SERVER.
const LAZY_TCP_SERVER: &str = include_str!("programs/dpf_lazy_tcp_server.py");

/// One test's lab: its scratch dir (the programs, their logs, portfwd's state and logs)
/// and portfwd on gwa once started. The daemon goes before the lab.
struct Setup {
    portfwd: Option<Portfwd>,
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

fn wait_line(path: &Path, needle: &str, timeout: Duration) -> String {
    wait_line_containing(path, needle, timeout)
}

/// The port of an `ip:port` string.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// Every public port the shim log reports for `DPF mapped KIND PRIVATE -> public ...`.
fn mapped_ports(log: &str, kind: &str, private: &str) -> Vec<u16> {
    let needle = format!("DPF mapped {kind} {private} -> public {PUBLIC}:");
    log.lines()
        .filter_map(|l| l.split(&needle).nth(1))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        })
        .collect()
}

/// The number at `path` (object keys) in iperf3's JSON report, if it is there.
fn json_num(json: &str, path: &[&str]) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    path.iter().try_fold(&v, |v, k| v.get(k))?.as_f64()
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let lab = Lab::up();
        let dir = Scratch::new(&format!("dpf-shim-{tag}"), &lab);
        for (name, body) in [
            ("sha_server.py", SHA_SERVER),
            ("sha_client.py", SHA_CLIENT),
            ("udp_echo.py", UDP_ECHO),
            ("udp_client.py", UDP_CLIENT),
            ("binder.py", BINDER),
            ("eph_udp_client.py", EPHEMERAL_UDP_CLIENT),
            ("lazy_tcp_server.py", LAZY_TCP_SERVER),
        ] {
            fs::write(dir.join(name), body).unwrap();
        }
        for bin in ["gcb-portfwd", "gcb-dpf-request", "gcb-brokerd", "libgcb.so"] {
            artifact(bin);
        }
        Setup {
            portfwd: None,
            dir,
            lab,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Starts gcb-portfwd on gwa (keyed; state and logs in DIR) for 10.1.0.0/24 with
    /// public ports `ports`, probing every PROBE_SECS, and `extra`.
    fn start_portfwd(&mut self, ports: &str, extra: &[&str]) {
        let interval = format!("--probe-interval-secs={PROBE_SECS}");
        let mut args = vec!["--private", "10.1.0.0/24", "--ports", ports, &interval];
        args.extend_from_slice(extra);
        self.portfwd = Some(Portfwd::start(&self.lab, &self.dir, &args));
    }

    fn start_broker(&self) -> Broker {
        Broker::start(
            &self.lab,
            Host::P1,
            BROKER,
            true,
            &[],
            &self.path("broker.log"),
        )
    }

    /// Runs `prog` in `host` under `gcb-run OPTS --log info --log-file DIR/NAME.shim.log`;
    /// stdout to DIR/NAME.out, stderr to DIR/NAME.err.
    fn shim(
        &self,
        host: Host,
        name: &str,
        opts: &[&str],
        prog: &[&str],
        stdin: Option<Stdio>,
    ) -> Proc {
        let log = self.path(&format!("{name}.shim.log"));
        let mut cmd = gcb_run(&self.lab, host, true, opts, Some(("info", &log)));
        cmd.args(prog)
            .stdout(fs::File::create(self.path(&format!("{name}.out"))).unwrap())
            .stderr(fs::File::create(self.path(&format!("{name}.err"))).unwrap());
        if let Some(s) = stdin {
            cmd.stdin(s);
        }
        self.lab.spawn(&mut cmd).unwrap()
    }

    /// A python script of DIR under the shim with `--dpf 10.1.0.1` (plus `opts`).
    fn py_shim(&self, host: Host, name: &str, opts: &[&str], script: &str, args: &[&str]) -> Proc {
        let mut o = vec!["--dpf", "10.1.0.1"];
        o.extend_from_slice(opts);
        let py = python().to_owned();
        let script = self.path(script);
        let mut prog = vec![py.as_str(), "-u", script.to_str().unwrap()];
        prog.extend_from_slice(args);
        self.shim(host, name, &o, &prog, None)
    }

    /// `ADDR ip:port` printed by NAME's server.
    fn addr(&self, name: &str) -> String {
        let line = wait_line(&self.path(&format!("{name}.out")), "ADDR ", T);
        line.trim_start_matches("ADDR ").trim().to_owned()
    }

    /// The public port the shim of NAME mapped for `private`, waiting for the log line.
    fn mapped(&self, name: &str, kind: &str, private: &str) -> u16 {
        let log = self.path(&format!("{name}.shim.log"));
        wait_line(&log, &format!("DPF mapped {kind} {private} -> public"), T);
        mapped_ports(&fs::read_to_string(&log).unwrap(), kind, private)[0]
    }

    /// Runs the python SHA_CLIENT in `host` (under the shim with `shim_opts` if given) to
    /// `ip:port` with `n` random bytes; asserts the server's sha256 and length match what
    /// was sent and returns the peer address the server saw.
    fn sha_roundtrip(
        &self,
        host: Host,
        shim_opts: Option<&[&str]>,
        addr: &str,
        n: usize,
    ) -> String {
        self.try_sha_roundtrip(host, shim_opts, addr, n)
            .unwrap_or_else(|e| panic!("{host} -> {addr}: {e}"))
    }

    fn try_sha_roundtrip(
        &self,
        host: Host,
        shim_opts: Option<&[&str]>,
        addr: &str,
        n: usize,
    ) -> Result<String, String> {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        let py = python().to_owned();
        let script = self.path("sha_client.py");
        let mut cmd = match shim_opts {
            Some(opts) => {
                let mut c = gcb_run(&self.lab, host, true, opts, None);
                c.arg(&py);
                c
            }
            None => self.lab.cmd(host, &py),
        };
        cmd.arg(&script)
            .args([ip, port, &n.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = self.lab.spawn(&mut cmd).unwrap().finish(T);
        let o = text(&out);
        let sent = o
            .lines()
            .find_map(|l| l.strip_prefix("SENT "))
            .ok_or_else(|| format!("client failed: {o}"))?;
        let got = o
            .lines()
            .find_map(|l| l.strip_prefix("GOT "))
            .ok_or_else(|| format!("no answer: {o}"))?;
        let mut g = got.split_whitespace();
        let want = sent.to_owned();
        let have = format!("{} {}", g.next().unwrap_or(""), g.next().unwrap_or(""));
        if have != want {
            return Err(format!("sent {want}, server got {have}"));
        }
        Ok(g.next().unwrap_or("").to_owned())
    }

    /// Runs UDP_CLIENT in p1 to `addr`; true iff every datagram came back intact.
    fn udp_echo_ok(&self, from: Host, addr: &str, count: u32) -> Result<(), String> {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        let out = self.lab.run(
            from,
            python(),
            [
                self.path("udp_client.py").to_str().unwrap(),
                ip,
                port,
                &count.to_string(),
                "1200",
            ],
            Duration::from_secs(30),
        );
        let o = text(&out);
        if o.contains(&format!("ECHOED {count}/{count}")) {
            Ok(())
        } else {
            Err(o)
        }
    }

    fn nft(&self, args: &str) -> String {
        let out = self.lab.sh(Host::Gwa, &format!("nft {args}"), T);
        assert!(out.status.success(), "nft {args}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// portfwd's two dnat maps, as `nft list map` prints them.
    fn maps(&self) -> String {
        portfwd_maps(&self.lab)
    }

    /// True iff `nft list map ip gcb_portfwd fwd_KIND` has `port : private-ip . private-port`.
    fn has_map(&self, kind: &str, public: u16, private: &str) -> bool {
        let (ip, port) = private.rsplit_once(':').unwrap();
        self.nft(&format!("list map ip gcb_portfwd fwd_{kind}"))
            .contains(&format!("{public} : {ip} . {port}"))
    }

    /// Number of elements in both maps.
    fn map_elements(&self) -> usize {
        self.maps().matches(" : 10.").count()
    }

    /// `gcb-dpf-request query` from a2: the JSON reply.
    fn query(&self, kind: &str, public: u16) -> String {
        let mut args = vec![
            "--server".to_owned(),
            "10.1.0.1".to_owned(),
            "query".to_owned(),
            format!("{PUBLIC}:{public}"),
        ];
        if kind == "udp" {
            args.push("--udp".into());
        }
        let out = self.lab.run(Host::A2, artifact("gcb-dpf-request"), args, T);
        text(&out)
    }

    /// A file of `n` random bytes in DIR; returns its sha256.
    fn payload(&self, name: &str, n: usize) -> String {
        let data = random_bytes(n);
        fs::write(self.path(name), &data).unwrap();
        sha256(&data)
    }

    fn file_sha(&self, name: &str) -> String {
        sha256(&fs::read(self.path(name)).unwrap_or_default())
    }

    /// Shim log lines of NAME at warn level or above: log lines (`libgcb[pid]: warn:`,
    /// `error:` for the refusals that repeat a notice) and
    /// notices (`gcb: warning:`/`gcb: error:`, the first of each condition since issue #13).
    fn warn_lines(&self, name: &str) -> Vec<String> {
        self.read(&format!("{name}.shim.log"))
            .lines()
            .filter(|l| {
                l.contains("]: warn: ")
                    || l.contains("]: error: ")
                    || l.starts_with("gcb: warning: ")
                    || l.starts_with("gcb: error: ")
            })
            .map(str::to_owned)
            .collect()
    }
}

/// Item 1: TCP from p1 through gwa's public address to unmodified servers in a1: ncat (p1
/// sends a file, a1 writes it) and python http.server (its "Serving" line is getsockname(),
/// curl on p1 fetches a file).
#[test]
fn tcp_ncat_and_http_server_reached_from_p1() {
    let mut s = Setup::new("tcp");
    s.start_portfwd(PORTS, &[]);
    // Nothing is forwarded before a server asks.
    assert!(!s.lab.tcp_connects(Host::P1, PUBLIC, 20000));

    // ncat: p1 -> 203.0.113.1:Q -> a1:7000, 1 MiB.
    let want = s.payload("ncat.in", 1 << 20);
    let ncat = s.shim(
        Host::A1,
        "ncat",
        &["--dpf", "10.1.0.1"],
        &["ncat", "-4", "-l", "7000", "--recv-only"],
        None,
    );
    let q = s.mapped("ncat", "Tcp", "10.1.0.11:7000");
    assert!((20000..=29999).contains(&q), "public port {q}");
    assert!(s.has_map("tcp", q, "10.1.0.11:7000"), "{}", s.maps());
    s.lab.wait_for_tcp_listen(Host::A1, 7000, T).unwrap();
    let tx = s.lab.sh(
        Host::P1,
        &format!(
            "ncat -w 3 --send-only {PUBLIC} {q} < {}",
            s.path("ncat.in").display()
        ),
        T,
    );
    assert!(
        tx.status.success(),
        "ncat p1 -> {PUBLIC}:{q}: {}",
        text(&tx)
    );
    let mut ncat = ncat;
    let st = ncat.wait_timeout(T).unwrap();
    assert!(st.is_some_and(|s| s.success()), "ncat server: {st:?}");
    drop(ncat);
    assert_eq!(
        s.file_sha("ncat.out"),
        want,
        "ncat: a1 received {} bytes",
        s.read("ncat.out").len()
    );

    // python http.server: the Serving line is the public address; curl from p1.
    let www = s.path("www");
    fs::create_dir_all(&www).unwrap();
    let data = random_bytes(3 << 20);
    fs::write(www.join("f.bin"), &data).unwrap();
    let py = python().to_owned();
    let _http = s.shim(
        Host::A1,
        "http",
        &["--dpf", "10.1.0.1"],
        &[
            &py,
            "-u",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
            www.to_str().unwrap(),
        ],
        None,
    );
    let serving = wait_line(&s.path("http.out"), "Serving HTTP on", T);
    let hq = s.mapped("http", "Tcp", "10.1.0.11:8000");
    assert!(
        serving.contains(&format!("Serving HTTP on {PUBLIC} port {hq} ")),
        "getsockname() is not the public address {PUBLIC}:{hq}: {serving}"
    );
    assert_ne!(hq, q, "two live mappings share a public port");
    for i in 0..2 {
        let out = s.lab.run(
            Host::P1,
            "curl",
            [
                "-sS",
                "--max-time",
                "10",
                "-o",
                s.path("curl.out").to_str().unwrap(),
                &format!("http://{PUBLIC}:{hq}/f.bin"),
            ],
            Duration::from_secs(15),
        );
        assert!(out.status.success(), "curl #{i}: {}", text(&out));
        assert_eq!(
            s.file_sha("curl.out"),
            sha256(&data),
            "curl #{i} got a different file"
        );
    }
    // The server saw p1 itself (dnat only, no masquerade on the way in).
    let err = s.read("http.err");
    assert!(err.contains("203.0.113.10 - - "), "http.server log:\n{err}");
    assert!(
        s.warn_lines("ncat").is_empty() && s.warn_lines("http").is_empty(),
        "unexpected warnings: {:?} {:?}",
        s.warn_lines("ncat"),
        s.warn_lines("http")
    );
}

/// iperf3 -s under the shim: two client runs from p1 to the same public port (iperf3
/// re-creates its listening socket after every test, and the advertised address must stay
/// valid).
#[test]
fn tcp_iperf3_twice_at_the_same_public_port() {
    let mut s = Setup::new("iperf");
    s.start_portfwd(PORTS, &[]);
    let _srv = s.shim(
        Host::A1,
        "iperf3",
        &["--dpf", "10.1.0.1"],
        &["iperf3", "-s", "-4", "-p", "5201"],
        None,
    );
    let q = s.mapped("iperf3", "Tcp", "10.1.0.11:5201");
    s.lab.wait_for_tcp_listen(Host::A1, 5201, T).unwrap();
    let mut results = Vec::new();
    for run in 1..=2 {
        let out = s.lab.run(
            Host::P1,
            "iperf3",
            [
                "-c",
                PUBLIC,
                "-p",
                &q.to_string(),
                "-t",
                "1",
                "-J",
                "--connect-timeout",
                "3000",
            ],
            Duration::from_secs(15),
        );
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let bytes = json_num(&json, &["end", "sum_received", "bytes"]).unwrap_or(0.0);
        let ok = out.status.success() && !json.contains("\"error\"") && bytes > 0.0;
        results.push(format!(
            "run {run}: exit {:?}, received {bytes} bytes{}",
            out.status.code(),
            if ok {
                String::new()
            } else {
                format!(
                    "\n{}\nshim log: {:?}",
                    text(&out),
                    mapped_ports(&s.read("iperf3.shim.log"), "Tcp", "10.1.0.11:5201")
                )
            }
        ));
        if !ok {
            break;
        }
        // iperf3 re-listens after the test; wait for the listener to be back.
        std::thread::sleep(Duration::from_millis(300));
        s.lab.wait_for_tcp_listen(Host::A1, 5201, T).unwrap();
    }
    let all_ok = results.len() == 2 && results.iter().all(|r| !r.contains('\n'));
    assert!(
        all_ok,
        "iperf3 p1 -> {PUBLIC}:{q} (mapped public ports for 10.1.0.11:5201 over time: {:?}):\n{}",
        mapped_ports(&s.read("iperf3.shim.log"), "Tcp", "10.1.0.11:5201"),
        results.join("\n")
    );
}

/// UDP from p1 through gwa: a python echo server (getsockname is public) and socat
/// `UDP4-RECVFROM,fork EXEC:cat` (forked children share the mapped socket).
#[test]
fn udp_python_echo_and_socat_reached_from_p1() {
    let mut s = Setup::new("udp");
    s.start_portfwd(PORTS, &[]);
    let _echo = s.py_shim(Host::A1, "echo", &[], "udp_echo.py", &["7001"]);
    let addr = s.addr("echo");
    let q = s.mapped("echo", "Udp", "10.1.0.11:7001");
    assert_eq!(
        addr,
        format!("{PUBLIC}:{q}"),
        "getsockname() of the UDP socket"
    );
    assert!(s.has_map("udp", q, "10.1.0.11:7001"), "{}", s.maps());
    s.udp_echo_ok(Host::P1, &addr, 20)
        .unwrap_or_else(|e| panic!("python echo via {addr}: {e}"));

    let _socat = s.shim(
        Host::A1,
        "socat",
        &["--dpf", "10.1.0.1"],
        &["socat", "-T", "1", "UDP4-RECVFROM:7002,fork", "EXEC:cat"],
        None,
    );
    let sq = s.mapped("socat", "Udp", "10.1.0.11:7002");
    s.lab.wait_for_udp_bind(Host::A1, 7002, T).unwrap();
    s.udp_echo_ok(Host::P1, &format!("{PUBLIC}:{sq}"), 5)
        .unwrap_or_else(|e| panic!("socat via {PUBLIC}:{sq}: {e}"));
    // The forked children exited (closing their copies): the parent's mapping stays.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        s.has_map("udp", sq, "10.1.0.11:7002"),
        "socat's mapping went away when a forked child exited: {}",
        s.maps()
    );
    s.udp_echo_ok(Host::P1, &format!("{PUBLIC}:{sq}"), 3)
        .unwrap_or_else(|e| panic!("socat again via {PUBLIC}:{sq}: {e}"));
    assert!(
        s.warn_lines("echo").is_empty() && s.warn_lines("socat").is_empty(),
        "unexpected warnings: {:?} {:?}",
        s.warn_lines("echo"),
        s.warn_lines("socat")
    );
}

/// iperf3 -u: the TCP control connection and the UDP data socket are bound to the same
/// port; both must be mapped, and the UDP data must arrive at the public port the client
/// was given (the same port as the control connection).
#[test]
fn udp_iperf3_from_p1() {
    let mut s = Setup::new("iperfu");
    s.start_portfwd(PORTS, &[]);
    let _srv = s.shim(
        Host::A1,
        "iperf3u",
        &["--dpf", "10.1.0.1"],
        &["iperf3", "-s", "-4", "-p", "5201"],
        None,
    );
    let q = s.mapped("iperf3u", "Tcp", "10.1.0.11:5201");
    s.lab.wait_for_tcp_listen(Host::A1, 5201, T).unwrap();
    let out = s.lab.run(
        Host::P1,
        "iperf3",
        [
            "-c",
            PUBLIC,
            "-p",
            &q.to_string(),
            "-u",
            "-b",
            "100M",
            "-t",
            "2",
            "-J",
            "--connect-timeout",
            "3000",
        ],
        Duration::from_secs(20),
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = s.read("iperf3u.shim.log");
    let udp_ports = mapped_ports(&log, "Udp", "10.1.0.11:5201");
    let packets = json_num(&json, &["end", "sum", "packets"])
        .or_else(|| json_num(&json, &["end", "sum_received", "packets"]))
        .unwrap_or(0.0);
    let lost = json_num(&json, &["end", "sum", "lost_percent"])
        .or_else(|| json_num(&json, &["end", "sum_received", "lost_percent"]))
        .unwrap_or(100.0);
    assert!(
        out.status.success() && !json.contains("\"error\"") && packets > 0.0 && lost < 50.0,
        "iperf3 -u p1 -> {PUBLIC}:{q} (TCP control mapped to {q}, UDP data socket mapped to \
         {udp_ports:?}): exit {:?}, packets {packets}, lost {lost}%\n{}\nshim log:\n{log}",
        out.status.code(),
        text(&out)
    );
    assert!(
        !udp_ports.is_empty(),
        "the UDP socket was never mapped:\n{log}"
    );
}

/// Item 2: a2 -> a1 by the advertised public address goes straight over the private network:
/// the server sees 10.1.0.12, not the gateway.
#[test]
fn same_network_peer_connects_directly() {
    let mut s = Setup::new("direct");
    s.start_portfwd(PORTS, &[]);
    let _srv = s.py_shim(Host::A1, "srv", &[], "sha_server.py", &["7000"]);
    let addr = s.addr("srv");
    let q = s.mapped("srv", "Tcp", "10.1.0.11:7000");
    assert_eq!(addr, format!("{PUBLIC}:{q}"));
    // Control: a2 without the shim goes through the gateway (portfwd's hairpin
    // masquerade), so the server sees the gateway.
    assert_eq!(
        s.sha_roundtrip(Host::A2, None, &addr, 100_000),
        "10.1.0.1",
        "a2 -> {addr} without the shim"
    );
    // From outside: the server sees p1.
    assert_eq!(
        s.sha_roundtrip(Host::P1, None, &addr, 100_000),
        "203.0.113.10"
    );
    // From a2 under the shim: direct, the server sees a2's own address.
    let log = s.path("a2.shim.log");
    let log_s = log.to_str().unwrap();
    let opts = ["--dpf", "10.1.0.1", "--log", "debug", "--log-file", log_s];
    let peer = s.sha_roundtrip(Host::A2, Some(&opts), &addr, 500_000);
    assert_eq!(
        peer,
        "10.1.0.12",
        "a2 -> {addr} did not go directly; a2's shim log:\n{}",
        s.read("a2.shim.log")
    );
    assert!(
        s.read("a2.shim.log")
            .contains(&format!("{addr} is our neighbour 10.1.0.11:7000")),
        "{}",
        s.read("a2.shim.log")
    );
    // The same with curl against http.server (an unmodified client).
    let www = s.path("www");
    fs::create_dir_all(&www).unwrap();
    let data = random_bytes(1 << 20);
    fs::write(www.join("f.bin"), &data).unwrap();
    let py = python().to_owned();
    let _http = s.shim(
        Host::A1,
        "http",
        &["--dpf", "10.1.0.1"],
        &[
            &py,
            "-u",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
            www.to_str().unwrap(),
        ],
        None,
    );
    wait_line(&s.path("http.out"), "Serving HTTP on", T);
    let hq = s.mapped("http", "Tcp", "10.1.0.11:8000");
    let curl = s
        .lab
        .spawn(
            gcb_run(&s.lab, Host::A2, true, &["--dpf", "10.1.0.1"], None)
                .args(["curl", "-sS", "--max-time", "10"])
                .arg("-o")
                .arg(s.path("curl.out"))
                .arg(format!("http://{PUBLIC}:{hq}/f.bin"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap()
        .finish(Duration::from_secs(15));
    assert!(curl.status.success(), "curl in a2: {}", text(&curl));
    assert_eq!(s.file_sha("curl.out"), sha256(&data));
    let err = s.read("http.err");
    assert!(
        err.contains("10.1.0.12 - - ") && !err.contains("203.0.113.1 - - "),
        "http.server saw:\n{err}"
    );
}

/// Items 3 and 6: kill -9 portfwd and restart it: the shim's mapping still works and the kernel
/// maps are the same; a hand-flushed table is restored by the next sync; an administrator's
/// tables (one made before portfwd started, one after) are byte-identical at the end.
#[test]
fn portfwd_kill9_restart_and_flush_keep_the_shim_mapping_admin_rules_untouched() {
    let mut s = Setup::new("restart");
    s.nft(
        "-f - <<'EOF'\ntable inet admin {\n chain c {\n  type filter hook input priority 10; policy accept;\n  tcp dport 2222 counter accept comment \"admin-before\"\n }\n}\nEOF",
    );
    s.start_portfwd(PORTS, &[]);
    s.nft(
        "-f - <<'EOF'\ntable ip adminnat {\n chain pre {\n  type nat hook prerouting priority dstnat - 5; policy accept;\n  iifname \"wan0\" tcp dport 2223 dnat to 10.1.0.12:2223 comment \"admin-after\"\n }\n}\nEOF",
    );
    let admin = |s: &Setup| s.nft("list table inet admin") + &s.nft("list table ip adminnat");
    let admin_before = admin(&s);

    let _srv = s.py_shim(Host::A1, "srv", &[], "sha_server.py", &["7000"]);
    let _echo = s.py_shim(Host::A1, "echo", &[], "udp_echo.py", &["7001"]);
    let addr = s.addr("srv");
    let uaddr = s.addr("echo");
    let q = s.mapped("srv", "Tcp", "10.1.0.11:7000");
    assert_eq!(addr, format!("{PUBLIC}:{q}"));
    s.sha_roundtrip(Host::P1, None, &addr, 200_000);
    s.udp_echo_ok(Host::P1, &uaddr, 5).unwrap();
    let before = s.maps();
    assert!(
        before.contains(&format!("{q} : 10.1.0.11 . 7000")),
        "{before}"
    );

    // kill -9, restart with the same state directory.
    let portfwd = s.portfwd.as_mut().unwrap();
    portfwd.crash();
    portfwd.restart(&s.lab);
    assert_eq!(s.maps(), before, "kernel maps after kill -9 + restart");
    s.sha_roundtrip(Host::P1, None, &addr, 200_000);
    s.udp_echo_ok(Host::P1, &uaddr, 5).unwrap();
    // The restarted daemon probes the shim's probe sockets: live, so kept.
    std::thread::sleep(Duration::from_secs(3 * PROBE_SECS + 1));
    assert_eq!(
        s.maps(),
        before,
        "maps after three probe rounds of the new daemon"
    );
    s.sha_roundtrip(Host::P1, None, &addr, 200_000);

    // Flush portfwd's table by hand: forwarding stops, the next sync restores it.
    // (Checked in the same shell as the flush: a sync can come at any moment after it.)
    let flushed = s.nft("flush table ip gcb_portfwd && nft list table ip gcb_portfwd");
    assert!(!flushed.contains("dnat"), "the flush left: {flushed}");
    let took = wait_until(
        "sync restores the flushed table and p1 reaches a1 again",
        Duration::from_secs(3 * PROBE_SECS + 3),
        || s.try_sha_roundtrip(Host::P1, None, &addr, 50_000).is_ok(),
    );
    eprintln!("flushed table restored after {took:?}");
    assert_eq!(s.maps(), before, "maps after the sync");
    s.sha_roundtrip(Host::P1, None, &addr, 200_000);
    s.udp_echo_ok(Host::P1, &uaddr, 5).unwrap();

    // The administrator's tables are byte-identical throughout.
    let admin_after = admin(&s);
    assert_eq!(admin_after, admin_before);
    assert!(admin_after.contains("admin-before") && admin_after.contains("admin-after"));
    assert!(
        s.warn_lines("srv").is_empty(),
        "the shim warned: {:?}",
        s.warn_lines("srv")
    );
}

/// Item 4: A server killed with SIGKILL loses its mappings within about one probe interval
/// (gone from the kernel and from a same-network query); a server that closes its sockets
/// has them deleted at once by the shim, and so does one that connect()s a mapped socket.
#[test]
fn dead_and_closed_servers_lose_their_mappings() {
    let mut s = Setup::new("probe");
    s.start_portfwd(PORTS, &[]);

    // SIGKILL: the probe notices.
    let mut victim = s.py_shim(Host::A1, "victim", &[], "sha_server.py", &["7000"]);
    let addr = s.addr("victim");
    let q = s.mapped("victim", "Tcp", "10.1.0.11:7000");
    s.sha_roundtrip(Host::P1, None, &addr, 10_000);
    assert!(s.has_map("tcp", q, "10.1.0.11:7000"));
    assert!(
        s.query("tcp", q).contains("\"private\":\"10.1.0.11:7000\""),
        "{}",
        s.query("tcp", q)
    );
    victim.signal_group(libc::SIGKILL);
    victim.wait_timeout(T).unwrap();
    drop(victim);
    let took = wait_until(
        "a killed server's mapping is removed",
        Duration::from_secs(PROBE_SECS + 2),
        || !s.has_map("tcp", q, "10.1.0.11:7000"),
    );
    eprintln!("killed server's mapping removed after {took:?}");
    let reply = s.query("tcp", q);
    assert!(
        !reply.contains("\"private\""),
        "query after removal: {reply}"
    );
    assert!(!s.lab.tcp_connects(Host::P1, PUBLIC, q));

    // Clean close: deleted by the shim, before any probe could.
    let binder = s.path("binder.py");
    let mut closer = s.shim(
        Host::A1,
        "closer",
        &["--dpf", "10.1.0.1"],
        &[
            python(),
            "-u",
            binder.to_str().unwrap(),
            "tcp:7100",
            "udp:7101",
        ],
        Some(Stdio::piped()),
    );
    wait_line(&s.path("closer.out"), "READY", T);
    let tq = s.mapped("closer", "Tcp", "10.1.0.11:7100");
    let uq = s.mapped("closer", "Udp", "10.1.0.11:7101");
    let out = s.read("closer.out");
    assert!(
        out.contains(&format!("tcp 7100 OK {PUBLIC}:{tq}"))
            && out.contains(&format!("udp 7101 OK {PUBLIC}:{uq}")),
        "{out}"
    );
    s.sha_roundtrip(Host::P1, None, &format!("{PUBLIC}:{tq}"), 10_000);
    assert!(s.has_map("tcp", tq, "10.1.0.11:7100") && s.has_map("udp", uq, "10.1.0.11:7101"));
    let mut stdin = closer.child_mut().stdin.take().unwrap();
    let t0 = Instant::now();
    stdin.write_all(b"close\n").unwrap();
    stdin.flush().unwrap();
    wait_line(&s.path("closer.out"), "CLOSED", T);
    let took = wait_until(
        "closed sockets' mappings deleted promptly",
        Duration::from_millis(1500),
        || !s.has_map("tcp", tq, "10.1.0.11:7100") && !s.has_map("udp", uq, "10.1.0.11:7101"),
    );
    eprintln!(
        "closed sockets' mappings deleted {:?} after the close ({took:?} after CLOSED)",
        t0.elapsed()
    );
    let log = s.read("closer.shim.log");
    for (p, private) in [(tq, "10.1.0.11:7100"), (uq, "10.1.0.11:7101")] {
        assert!(
            log.contains(&format!("DPF mapping {PUBLIC}:{p} -> {private} deleted")),
            "the shim did not delete {private}:\n{log}"
        );
    }
    assert_eq!(s.map_elements(), 0, "{}", s.maps());
    drop(stdin);
    drop(closer);

    // connect() on a mapped socket makes it active: its mapping is deleted (paper 3.2.1).
    let go = s.path("connect.go");
    fs::write(
        s.path("connector.py"),
        format!(
            "import os, socket, time\n\
             u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             u.bind(('0.0.0.0', 7400))\n\
             print('ADDR %s:%d' % u.getsockname(), flush=True)\n\
             while not os.path.exists({go:?}):\n    time.sleep(0.05)\n\
             u.connect(('203.0.113.10', 9))\n\
             print('CONNECTED %s:%d' % u.getsockname(), flush=True)\n\
             time.sleep(60)\n"
        ),
    )
    .unwrap();
    let _conn = s.py_shim(Host::A1, "connector", &[], "connector.py", &[]);
    let cq = s.mapped("connector", "Udp", "10.1.0.11:7400");
    assert_eq!(s.addr("connector"), format!("{PUBLIC}:{cq}"));
    assert!(s.has_map("udp", cq, "10.1.0.11:7400"), "{}", s.maps());
    fs::write(&go, b"").unwrap();
    let line = wait_line(&s.path("connector.out"), "CONNECTED", T);
    assert!(
        line.contains("CONNECTED 10.1.0.11:7400"),
        "getsockname() of a connected socket is its own address: {line}"
    );
    assert!(
        !s.has_map("udp", cq, "10.1.0.11:7400"),
        "mapping kept after connect(): {}",
        s.maps()
    );
    assert!(
        s.read("connector.shim.log").contains(&format!(
            "DPF mapping {PUBLIC}:{cq} -> 10.1.0.11:7400 deleted"
        )),
        "{}",
        s.read("connector.shim.log")
    );
}

/// Item 5: Refusals through the shim. With DPF only: bind() fails with EADDRNOTAVAIL (port
/// range exhausted, quota) or EACCES (an address portfwd will not map for this client), one
/// warn line each, nothing installed. With a broker as well: the refused socket is served
/// by GCB (getsockname is the broker's proxy) and p2 reaches it.
#[test]
fn refusals_fail_bind_or_fall_back_to_gcb() {
    let mut s = Setup::new("refuse");
    // One public port, two mappings per client.
    s.start_portfwd("20000-20000", &["--quota", "2"]);
    // A second address on a1 that is not a1's source address towards portfwd.
    let out = s.lab.sh(Host::A1, "ip addr add 10.1.0.13/24 dev eth0", T);
    assert!(out.status.success(), "{}", text(&out));

    let binds = [
        "tcp:7100",
        "tcp:7101",
        "udp:7102",
        "udp:7103",
        "tcp:10.1.0.13:7104",
        "udp:0",
    ];
    let only = s.py_shim(Host::A1, "only", &[], "binder.py", &binds);
    wait_line(&s.path("only.out"), "READY", T);
    let out = s.read("only.out");
    let eaddrnotavail = libc::EADDRNOTAVAIL;
    let eacces = libc::EACCES;
    for want in [
        format!("tcp 7100 OK {PUBLIC}:20000"),
        format!("tcp 7101 ERR {eaddrnotavail}"),
        format!("udp 7102 OK {PUBLIC}:20000"),
        format!("udp 7103 ERR {eaddrnotavail}"),
        format!("tcp 7104 ERR {eacces}"),
        // Port 0: refused at its getsockname(), which fails.
        format!("udp 0 ERR {eaddrnotavail}"),
    ] {
        assert!(
            out.contains(&want),
            "expected {want:?}; the program printed:\n{out}\nshim log:\n{}",
            s.read("only.shim.log")
        );
    }
    let warns = s.warn_lines("only");
    let one = |what: &str, needle: &[&str]| {
        let n = warns
            .iter()
            .filter(|l| needle.iter().all(|x| l.contains(x)))
            .count();
        assert_eq!(
            n, 1,
            "{what}: want one warn line with {needle:?}; got {warns:#?}"
        );
    };
    one("range", &["refused", "10.1.0.11:7101", "PortRange"]);
    one("quota", &["refused", "10.1.0.11:7103", "Quota"]);
    one("owner", &["refused", "10.1.0.13:7104", "NotOwner"]);
    one(
        "quota at getsockname",
        &["refused", "Quota", "(at getsockname)"],
    );
    assert_eq!(warns.len(), 4, "{warns:#?}");
    // Nothing installed for the refused ones.
    assert_eq!(s.map_elements(), 2, "{}", s.maps());
    assert!(s.has_map("tcp", 20000, "10.1.0.11:7100") && s.has_map("udp", 20000, "10.1.0.11:7102"));
    // The mapped one works.
    s.sha_roundtrip(Host::P1, None, &format!("{PUBLIC}:20000"), 100_000);
    drop(only);
    wait_until(
        "the first program's mappings removed",
        Duration::from_secs(PROBE_SECS + 3),
        || s.map_elements() == 0,
    );

    // With a broker as well: DPF where it can, GCB for the refused socket. Two port-0
    // UDP sockets: the first is DPF's (quota 2), the second is refused at getsockname()
    // and registered with the broker there and then.
    let _broker = s.start_broker();
    let _both = s.py_shim(
        Host::A1,
        "both",
        &["--broker", BROKER],
        "binder.py",
        &["tcp:7200", "tcp:7201", "udp:0", "udp:0"],
    );
    wait_line(&s.path("both.out"), "READY", T);
    let out = s.read("both.out");
    assert!(
        out.contains(&format!("tcp 7200 OK {PUBLIC}:20000")),
        "DPF socket: {out}\n{}",
        s.read("both.shim.log")
    );
    let gcb_line = out
        .lines()
        .find(|l| l.starts_with("tcp 7201 "))
        .unwrap_or_default()
        .to_owned();
    assert!(
        gcb_line.starts_with(&format!("tcp 7201 OK {BROKER}:")),
        "the refused socket is not GCB's: {out}\n{}",
        s.read("both.shim.log")
    );
    let gaddr = gcb_line.rsplit(' ').next().unwrap().to_owned();
    let udp0: Vec<&str> = out.lines().filter(|l| l.starts_with("udp 0 ")).collect();
    assert!(
        udp0.len() == 2
            && udp0[0] == format!("udp 0 OK {PUBLIC}:20000")
            && udp0[1].starts_with(&format!("udp 0 OK {BROKER}:")),
        "port-0 UDP sockets: want DPF's public address, then GCB's proxy: {out}\n{}",
        s.read("both.shim.log")
    );
    // GCB's accept() reports the real peer (p2), not the proxy.
    assert_eq!(
        s.sha_roundtrip(Host::P2, None, &gaddr, 300_000),
        "203.0.113.11"
    );
    s.sha_roundtrip(Host::P2, None, &format!("{PUBLIC}:20000"), 300_000);
    assert_eq!(s.map_elements(), 2, "{}", s.maps());
    assert!(
        s.warn_lines("both").is_empty(),
        "a refusal left to GCB is not a warning: {:?}",
        s.warn_lines("both")
    );
}

/// Item 7: GCB_BROKER and GCB_DPF_SERVER together: in a1 (portfwd on gwa) DPF serves the socket;
/// in b1 (nothing answers at 10.2.0.1) the shim falls back to GCB and p2 reaches the server
/// through the broker.
#[test]
fn dpf_and_gcb_together() {
    let mut s = Setup::new("both");
    s.start_portfwd(PORTS, &[]);
    let _broker = s.start_broker();
    let _a = s.py_shim(
        Host::A1,
        "a1srv",
        &["--broker", BROKER],
        "sha_server.py",
        &["7000"],
    );
    let a_addr = s.addr("a1srv");
    let q = s.mapped("a1srv", "Tcp", "10.1.0.11:7000");
    assert_eq!(a_addr, format!("{PUBLIC}:{q}"), "a1 is served by DPF");
    assert_eq!(
        s.sha_roundtrip(Host::P2, None, &a_addr, 300_000),
        "203.0.113.11"
    );

    let py = python().to_owned();
    let script = s.path("sha_server.py");
    let _b = s.shim(
        Host::B1,
        "b1srv",
        &["--dpf", "10.2.0.1", "--broker", BROKER],
        &[&py, "-u", script.to_str().unwrap(), "7000"],
        None,
    );
    let b_addr = s.addr("b1srv");
    assert!(
        b_addr.starts_with(&format!("{BROKER}:")),
        "b1 is not served by GCB: {b_addr}\n{}",
        s.read("b1srv.shim.log")
    );
    s.sha_roundtrip(Host::P2, None, &b_addr, 300_000);
    // And a1's DPF server from b1 (under the shim, across both NATs).
    let opts = ["--dpf", "10.2.0.1", "--broker", BROKER];
    assert_eq!(
        s.sha_roundtrip(Host::B1, Some(&opts), &a_addr, 100_000),
        "203.0.113.2"
    );
    assert_eq!(port_of(&a_addr), q);
    let warns = s.warn_lines("b1srv");
    assert!(
        warns.len() == 1 && warns[0].contains("10.2.0.1"),
        "b1's shim: want one warn line about the unreachable portfwd: {warns:#?}"
    );

    // DPF only, portfwd unreachable: bind() succeeds, the program serves locally (its
    // address stays the private one), one warn line.
    let _local = s.shim(
        Host::B1,
        "b1local",
        &["--dpf", "10.2.0.1"],
        &[&py, "-u", script.to_str().unwrap(), "7001"],
        None,
    );
    assert_eq!(s.addr("b1local"), "0.0.0.0:7001");
    assert_eq!(
        s.sha_roundtrip(Host::Gwb, None, "10.2.0.11:7001", 100_000),
        "10.2.0.1"
    );
    let warns = s.warn_lines("b1local");
    assert!(
        warns.len() == 1 && warns[0].contains("10.2.0.1") && warns[0].contains("locally"),
        "b1 without a broker: want one warn line about serving locally: {warns:#?}"
    );
}

/// A daemon that hands its bound socket to an exec'd image: the mapping and its probe
/// socket go with it (the probe socket shares the socket's fate across exec), so the
/// mapping survives several probe rounds after the exec, still serves, and goes away
/// when the exec'd image dies.
#[test]
fn exec_handoff_keeps_the_mapping_alive() {
    let mut s = Setup::new("exec");
    s.start_portfwd(PORTS, &[]);
    let child = s.path("exec_child.py");
    fs::write(
        &child,
        SHA_SERVER.replace(
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind((\"0.0.0.0\", int(sys.argv[1])))\ns.listen(16)",
            "s = socket.socket(fileno=int(sys.argv[1]))",
        ),
    )
    .unwrap();
    assert!(
        fs::read_to_string(&child).unwrap().contains("fileno="),
        "the child script must adopt the inherited fd"
    );
    fs::write(
        s.path("exec_parent.py"),
        include_str!("programs/dpf_exec_tcp_parent.py"),
    )
    .unwrap();
    let mut server = s.py_shim(
        Host::A1,
        "exec",
        &[],
        "exec_parent.py",
        &[child.to_str().unwrap()],
    );
    let q = s.mapped("exec", "Tcp", "10.1.0.11:7100");
    let parent = wait_line(&s.path("exec.out"), "PARENT ", T);
    let addr = s.addr("exec");
    assert_eq!(
        parent.trim_start_matches("PARENT ").trim(),
        addr,
        "the exec'd image must report the same public address"
    );
    assert_eq!(addr, format!("{PUBLIC}:{q}"));
    // Several probe rounds after the exec: a probe socket lost in the exec would have
    // been refused by now and the mapping removed.
    std::thread::sleep(Duration::from_secs(3 * PROBE_SECS));
    assert!(s.has_map("tcp", q, "10.1.0.11:7100"), "{}", s.maps());
    s.sha_roundtrip(Host::P1, None, &addr, 100_000);
    assert!(
        s.read("exec.shim.log").contains("inherited DPF mapping"),
        "{}",
        s.read("exec.shim.log")
    );
    server.signal_group(libc::SIGKILL);
    server.wait_timeout(T).unwrap();
    drop(server);
    wait_until(
        "the exec'd image's mapping is removed after it dies",
        Duration::from_secs(PROBE_SECS + 2),
        || !s.has_map("tcp", q, "10.1.0.11:7100"),
    );
}

/// The gcb-portfwd nft maps hold no rule for a private address of a1 whose port is `port`
/// (any public port); for failure messages, the maps.
fn no_rule_for(s: &Setup, port: u16) -> Result<(), String> {
    let maps = s.maps();
    if maps.contains(&format!("10.1.0.11 . {port}")) {
        Err(maps)
    } else {
        Ok(())
    }
}

/// Clients bind port 0 (Python `bind(("", 0))`, Rust `UdpSocket::bind("0.0.0.0:0")` +
/// `connect`): under DPF they exchange verified datagrams with a public server without
/// any forwarding rule being requested (the replies come back through the NAT's
/// conntrack), so they pay no portfwd round trip.
#[test]
fn ephemeral_udp_clients_get_no_forwarding_rule() {
    let mut s = Setup::new("ephudp");
    s.start_portfwd(PORTS, &[]);
    let py = python().to_owned();
    let _srv = s
        .lab
        .spawn(
            s.lab
                .cmd(Host::P2, &py)
                .arg("-u")
                .arg(s.path("udp_echo.py"))
                .arg("7001")
                .stdout(fs::File::create(s.path("p2echo.out")).unwrap())
                .stderr(Stdio::null()),
        )
        .unwrap();
    assert_eq!(s.addr("p2echo"), "0.0.0.0:7001");

    // Python, unconnected sendto/recvfrom; the maps are checked while it still holds the
    // socket.
    let go = s.path("eph.go");
    let mut client = s.shim(
        Host::A1,
        "eph",
        &["--dpf", "10.1.0.1"],
        &[
            &py,
            "-u",
            s.path("eph_udp_client.py").to_str().unwrap(),
            "203.0.113.11",
            "7001",
            "20",
            "1200",
            go.to_str().unwrap(),
        ],
        None,
    );
    let line = wait_line(&s.path("eph.out"), "ECHOED", Duration::from_secs(30));
    assert_eq!(line.trim(), "ECHOED 20/20", "{}", s.read("eph.shim.log"));
    let ss = s
        .lab
        .sh(Host::A1, "ss -uanpH | grep python | grep UNCONN", T);
    let port = String::from_utf8_lossy(&ss.stdout)
        .split_whitespace()
        .nth(3)
        .map(port_of)
        .unwrap_or_else(|| panic!("the client's socket in ss: {}", text(&ss)));
    assert_ne!(port, 0);
    no_rule_for(&s, port).unwrap_or_else(|m| panic!("a rule for the client's port {port}:\n{m}"));
    assert_eq!(s.map_elements(), 0, "{}", s.maps());
    fs::write(&go, b"").unwrap();
    let st = client.wait_timeout(T).unwrap();
    assert!(st.is_some_and(|st| st.success()), "client: {st:?}");
    let log = s.read("eph.shim.log");
    assert!(!log.contains("DPF mapped"), "the shim forwarded:\n{log}");

    // The benchmark client (Rust std: bind 0, connect, send/recv, 1 KiB verified echo).
    let bench_log = s.path("bench.shim.log");
    let out = s
        .lab
        .spawn(
            gcb_run(
                &s.lab,
                Host::A1,
                true,
                &["--dpf", "10.1.0.1"],
                Some(("info", &bench_log)),
            )
            .arg(artifact("gcb-bench-conn"))
            .args(["client", "203.0.113.11:7001", "--udp", "--count", "5"])
            .args(["--size", "1024"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        )
        .unwrap()
        .finish(Duration::from_secs(30));
    assert!(
        out.status.success() && text(&out).contains("\"ok\":true"),
        "gcb-bench-conn client: {}",
        text(&out)
    );
    let log = s.read("bench.shim.log");
    assert!(!log.contains("DPF mapped"), "the shim forwarded:\n{log}");
    assert_eq!(s.map_elements(), 0, "{}", s.maps());
    assert!(
        s.warn_lines("eph").is_empty() && s.warn_lines("bench").is_empty(),
        "{:?} {:?}",
        s.warn_lines("eph"),
        s.warn_lines("bench")
    );
}

/// A UDP socket bound to port 0 that asks its own address (getsockname) is forwarded
/// then: it learns 203.0.113.1:N, and p2's datagrams to that address reach it (echoed
/// intact).
#[test]
fn ephemeral_udp_socket_is_forwarded_at_getsockname() {
    let mut s = Setup::new("ephname");
    s.start_portfwd(PORTS, &[]);
    let _echo = s.py_shim(Host::A1, "echo", &[], "udp_echo.py", &["0"]);
    let addr = s.addr("echo");
    let log = wait_line(&s.path("echo.shim.log"), "DPF mapped Udp ", T);
    let private = log
        .split("DPF mapped Udp ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no mapping in the shim log:\n{log}"))
        .to_owned();
    assert!(private.starts_with("10.1.0.11:"), "{private}");
    let q = s.mapped("echo", "Udp", &private);
    assert_eq!(
        addr,
        format!("{PUBLIC}:{q}"),
        "getsockname() of the UDP socket"
    );
    assert!(s.has_map("udp", q, &private), "{}", s.maps());
    s.udp_echo_ok(Host::P2, &addr, 20)
        .unwrap_or_else(|e| panic!("p2 -> {addr}: {e}"));
    assert!(
        s.warn_lines("echo").is_empty(),
        "{:?}",
        s.warn_lines("echo")
    );
}

/// TCP bind(0) + listen(): forwarded at listen(), before the program asks its address;
/// getsockname() then reports the public address and p2 reaches the server through it.
#[test]
fn ephemeral_tcp_listener_is_forwarded_at_listen() {
    let mut s = Setup::new("ephtcp");
    s.start_portfwd(PORTS, &[]);
    let go = s.path("tcp.go");
    let _srv = s.py_shim(
        Host::A1,
        "lazy",
        &[],
        "lazy_tcp_server.py",
        &[go.to_str().unwrap()],
    );
    wait_line(&s.path("lazy.out"), "LISTENING", T);
    let log = s.path("lazy.shim.log");
    // Forwarded at listen(): the program has not called getsockname() yet.
    wait_line(&log, "DPF mapped Tcp 10.1.0.11:", T);
    assert!(!s.read("lazy.out").contains("ADDR"));
    let text_log = s.read("lazy.shim.log");
    let private = text_log
        .split("DPF mapped Tcp ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    let q = s.mapped("lazy", "Tcp", &private);
    assert!(s.has_map("tcp", q, &private), "{}", s.maps());
    fs::write(&go, b"").unwrap();
    let addr = s.addr("lazy");
    assert_eq!(
        addr,
        format!("{PUBLIC}:{q}"),
        "getsockname() after listen()"
    );
    assert_eq!(
        s.sha_roundtrip(Host::P2, None, &addr, 300_000),
        "203.0.113.11"
    );
    assert_eq!(
        mapped_ports(&s.read("lazy.shim.log"), "Tcp", &private),
        vec![q],
        "one forward only"
    );
    assert!(
        s.warn_lines("lazy").is_empty(),
        "{:?}",
        s.warn_lines("lazy")
    );
}

/// A port-0 UDP socket handed to an exec'd image before anyone asked its address stays
/// pending there: the new image's getsockname() forwards it, reports the public address,
/// and p2 reaches it.
#[test]
fn pending_socket_is_forwarded_in_the_execd_image() {
    let mut s = Setup::new("execq");
    s.start_portfwd(PORTS, &[]);
    let child = s.path("execq_child.py");
    fs::write(
        &child,
        UDP_ECHO.replace(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind((\"0.0.0.0\", int(sys.argv[1])))",
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, fileno=int(sys.argv[1]))",
        ),
    )
    .unwrap();
    assert!(fs::read_to_string(&child).unwrap().contains("fileno="));
    fs::write(
        s.path("execq_parent.py"),
        include_str!("programs/dpf_exec_udp_parent.py"),
    )
    .unwrap();
    let _srv = s.py_shim(
        Host::A1,
        "execq",
        &[],
        "execq_parent.py",
        &[child.to_str().unwrap()],
    );
    let addr = s.addr("execq");
    assert!(
        addr.starts_with(&format!("{PUBLIC}:")),
        "getsockname() in the exec'd image: {addr}\n{}",
        s.read("execq.shim.log")
    );
    s.udp_echo_ok(Host::P2, &addr, 10)
        .unwrap_or_else(|e| panic!("p2 -> {addr}: {e}"));
    assert_eq!(s.map_elements(), 1, "{}", s.maps());
}
