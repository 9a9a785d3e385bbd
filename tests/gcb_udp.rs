//! GCB over UDP in the lab (issue 5, "Shown in the lab"; paper 4.2.1-4.2.2): unmodified
//! datagram programs (python3 sockets, socat, iperf3, the examples' UDP echo) in a1 under
//! `scripts/gcb-run`, reached through the broker's proxy UDP address by p2 without the
//! shim, p2 with it and b1 with it (a1 <-> b1: both private, the broker relays), and a GCB
//! program in a1 talking to a plain server on p1. Every datagram is checked end to end
//! (sha256 of what was sent against what came back), and so is the sender address the
//! server's recvfrom() reported (the echo servers put it in front of their answer).
//!
//! Each test builds a lab of its own and starts `gcb-brokerd` on p1 at `--log debug`.
//! Broker counters are read from the stats line it prints at SIGTERM. Logs go to
//! `/tmp/gcb-udp-<lab>/`, kept (and named in the panic message) when a test fails.
//! Nothing is built here: a missing release artifact is a failure, never a skip. Needs
//! root (the lab panics without it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use gcb_lab::{
    artifact, gcb_run, python, random_bytes, read_text as read, sha256, wait_line, Broker, Host,
    Lab, Proc, Scratch,
};

const BROKER: &str = "203.0.113.10";
const BROKER_PORT: u16 = 9650;
/// Time for a server to come up and register.
const UP: Duration = Duration::from_secs(10);
/// Generous bound for one client run.
const RUN: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------

/// A UDP echo server. `echo.py PORT`: binds 0.0.0.0:PORT (`echo.py fd=N`: serves the
/// already bound socket N instead, one an exec'ing image handed over), prints
/// `ADDR IP:PORT` (getsockname()), then for every datagram prints
/// `RECV SENDER LEN SHA256 TAG` and answers `SENDER TAG\n` + the datagram to its sender.
/// SENDER is what recvfrom() reported. TAG: `OK`/`BAD` for a `GCBT SEQ SHA256\n BODY`
/// datagram whose body does/does not hash to SHA256, `RAW` for anything else. A datagram
/// starting with `LATE` is answered a second time 3 s later (`LATE-REPLY`). The datagram
/// `QUIT` closes the socket, prints `CLOSED` and exits.
const ECHO: &str = include_str!("programs/udp_echo.py");

/// The client side, several modes (all print `LOCAL IP:PORT`, getsockname() after the
/// first send):
/// * `echo TARGET RAW|ADDR SIZE...`: one random datagram per SIZE, waits (5 s) for the
///   answer; prints `ECHO SIZE SHA_SENT SHA_BACK REPLY_FROM SEEN TAG RTT_MS` (SEEN/TAG from
///   the answer's header with ADDR, `-` with RAW: the server echoes the bare datagram), or
///   `TIMEOUT SIZE`. `--bind PORT` binds the socket first (under GCB it registers).
///   `--pause SECS AT`: sleep SECS before the AT-th datagram.
/// * `stream TARGET N`: N numbered `GCBT SEQ SHA256\n BODY` datagrams (bodies of 16..1200
///   random bytes), 4 ms apart, never retransmitted; prints `SENT SEQ SHA256(datagram)` for
///   each and `REPLY REPLY_FROM SEEN TAG SEQ SHA256(echoed datagram)` for each answer
///   (`GARBLED HEX` for an answer that does not parse), until 4 s after the last send.
/// * `late TARGET`: sends one `LATE...` datagram, prints `FIRST REPLY_FROM INTACT` for the
///   answer, then `EXTRA ...` for anything else within 5 s, or `NOTHING-MORE`.
/// * `send TARGET HEX...`: sends each HEX (or `zeros:N`) as one datagram (one socket).
/// * `listen PORT SECS`: prints `GOT SENDER LEN SHA256` for every datagram received in SECS.
const CLIENT: &str = include_str!("programs/udp_client.py");

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where a host's datagrams come from on the public segment, for the broker or p1.
fn public_ip(host: Host) -> String {
    host.public_addr().to_string()
}

struct Rig {
    // Processes die before the namespaces go.
    broker: Option<Broker>,
    procs: Vec<Proc>,
    dir: Scratch,
    lab: Lab,
}

impl Rig {
    fn up(broker_args: &[&str]) -> Rig {
        let lab = Lab::up();
        let dir = Scratch::new("udp", &lab);
        fs::write(dir.join("echo.py"), ECHO).unwrap();
        fs::write(dir.join("client.py"), CLIENT).unwrap();
        let mut args = vec!["--log", "debug"];
        args.extend_from_slice(broker_args);
        let broker = Broker::start(&lab, Host::P1, BROKER, true, &args, &dir.join("broker.log"));
        lab.wait_for_udp_bind(Host::P1, BROKER_PORT, UP)
            .unwrap_or_else(|e| panic!("broker not up: {e}\n{}", broker.text()));
        Rig {
            broker: Some(broker),
            procs: Vec::new(),
            dir,
            lab,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn broker_log(&self) -> String {
        read(&self.path("broker.log"))
    }

    /// `program` in `host`, under gcb-run (shim log `TAG.shim.log`) when `gcb`.
    fn cmd(
        &self,
        host: Host,
        gcb: bool,
        tag: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Command {
        if !gcb {
            return self.lab.cmd(host, program);
        }
        let log = self.path(&format!("{tag}.shim.log"));
        let mut c = gcb_run(
            &self.lab,
            host,
            true,
            &["--broker", BROKER],
            Some(("debug", &log)),
        );
        c.arg(program);
        c
    }

    /// Spawns a long-running program, stdout to `TAG.out`, stderr to `TAG.err`.
    fn start(&mut self, mut cmd: Command, tag: &str) {
        cmd.stdout(File::create(self.path(&format!("{tag}.out"))).unwrap())
            .stderr(File::create(self.path(&format!("{tag}.err"))).unwrap());
        let p = self
            .lab
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawn {tag}: {e}"));
        self.procs.push(p);
    }

    /// The echo server (`ECHO`) on PORT in `host`; returns the address it printed.
    fn echo_server(&mut self, host: Host, gcb: bool, port: u16, tag: &str) -> String {
        let mut cmd = self.cmd(host, gcb, tag, python());
        cmd.arg("-u")
            .arg(self.path("echo.py"))
            .arg(port.to_string());
        self.start(cmd, tag);
        self.out_addr(tag, "ADDR ")
    }

    /// The address after `prefix` in the first such line of `TAG.out`.
    fn out_addr(&self, tag: &str, prefix: &str) -> String {
        let out = self.path(&format!("{tag}.out"));
        let line = wait_line(&out, UP, |l| l.starts_with(prefix)).unwrap_or_else(|| {
            panic!(
                "{tag} printed no {prefix:?} line: stdout {:?} stderr {:?}\n{}",
                read(&out),
                read(&self.path(&format!("{tag}.err"))),
                self.logs()
            )
        });
        line[prefix.len()..].trim().to_owned()
    }

    /// Runs the python client (`CLIENT`) in `host` to completion.
    fn client(&self, host: Host, gcb: bool, tag: &str, args: &[String]) -> Output {
        let mut cmd = self.cmd(host, gcb, tag, python());
        cmd.arg("-u").arg(self.path("client.py")).args(args);
        self.run(cmd, RUN)
    }

    fn run(&self, mut cmd: Command, timeout: Duration) -> Output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.lab
            .spawn(&mut cmd)
            .expect("spawn client")
            .finish(timeout)
    }

    /// Every long-running program and the broker are still alive.
    fn assert_alive(&mut self) {
        let broker = self.broker.as_mut().map(|b| &mut b.proc);
        for (i, p) in self.procs.iter_mut().chain(broker).enumerate() {
            let st = p.wait_timeout(Duration::ZERO).expect("wait");
            assert!(st.is_none(), "process #{i} exited: {st:?}\n{}", self.logs());
        }
    }

    /// Tails of every log, for failure messages.
    fn logs(&self) -> String {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        let mut s = format!("==== logs in {} ====\n", self.dir.display());
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e != "py"))
        {
            let t = read(f);
            let lines: Vec<&str> = t.lines().collect();
            s.push_str(&format!(
                "---- {} ----\n{}\n",
                f.file_name().unwrap_or_default().to_string_lossy(),
                lines[lines.len().saturating_sub(25)..].join("\n")
            ));
        }
        s
    }

    /// SIGTERMs the broker and returns the counters of the stats line it prints at exit.
    fn broker_stats(&mut self) -> HashMap<String, u64> {
        // Taken: a stopped broker is no longer expected alive.
        let mut b = self.broker.take().expect("broker running");
        b.stop_and_stats()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Programs first, then the broker; the scratch dir is kept if the test failed.
        for p in self
            .procs
            .iter_mut()
            .chain(self.broker.as_mut().map(|b| &mut b.proc))
        {
            let _ = p.kill();
        }
    }
}

/// One `ECHO` line of the client.
#[derive(Debug)]
struct Echo {
    size: usize,
    sent: String,
    back: String,
    reply_from: String,
    seen: String,
    tag: String,
    rtt_ms: f64,
}

/// Parses the client's output: (LOCAL address, echoes); panics on TIMEOUT or a failed run.
fn echoes(what: &str, out: &Output, rig: &Rig) -> (String, Vec<Echo>) {
    let stdout = text(&out.stdout);
    let fail = |why: &str| -> ! {
        panic!(
            "{what}: {why}\nstatus {:?}\nstdout:\n{stdout}\nstderr:\n{}\n{}",
            out.status,
            text(&out.stderr),
            rig.logs()
        )
    };
    if !out.status.success() {
        fail("client failed");
    }
    let mut local = String::new();
    let mut v = Vec::new();
    for l in stdout.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.first().copied() {
            Some("LOCAL") => local = w[1].to_owned(),
            Some("ECHO") if w.len() == 8 => v.push(Echo {
                size: w[1].parse().unwrap(),
                sent: w[2].to_owned(),
                back: w[3].to_owned(),
                reply_from: w[4].to_owned(),
                seen: w[5].to_owned(),
                tag: w[6].to_owned(),
                rtt_ms: w[7].parse().unwrap(),
            }),
            Some("TIMEOUT") => fail(&format!("no answer: {l}")),
            _ => fail(&format!("unexpected line {l:?}")),
        }
    }
    (local, v)
}

/// Sends one datagram of each size from `host` (under the shim if `gcb`) to the echo
/// server at `target` and checks every answer: same bytes back, from `target`, and (for
/// an `ECHO` server, `addr_header`) the server saw the sender at `sender_ip` and, if
/// `sender_port_is_local`, at the client's own port. Returns the echoes.
#[allow(clippy::too_many_arguments)]
fn check_echo(
    rig: &Rig,
    client: (Host, bool),
    target: &str,
    addr_header: bool,
    sizes: &[usize],
    extra: &[&str],
    sender_ip: &str,
    sender_port_is_local: bool,
) -> Vec<Echo> {
    let spec = (target, addr_header, sizes, extra);
    check_echo_local(rig, client, spec, sender_ip, sender_port_is_local).1
}

/// [`check_echo`], also returning the client's LOCAL address (its getsockname() right
/// after its first datagram).
fn check_echo_local(
    rig: &Rig,
    (host, gcb): (Host, bool),
    (target, addr_header, sizes, extra): (&str, bool, &[usize], &[&str]),
    sender_ip: &str,
    sender_port_is_local: bool,
) -> (String, Vec<Echo>) {
    let tag = format!(
        "client-{host}{}-{}",
        if gcb { "-gcb" } else { "" },
        target.replace([':', '.'], "_")
    );
    let mut args: Vec<String> = vec!["echo".into(), target.into()];
    args.push(if addr_header { "ADDR" } else { "RAW" }.into());
    args.extend(sizes.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = rig.client(host, gcb, &tag, &args);
    let (local, v) = echoes(&tag, &out, rig);
    let ctx = || format!("{tag}: local {local}\n{}", text(&out.stdout));
    assert_eq!(
        v.iter().map(|e| e.size).collect::<Vec<_>>(),
        sizes,
        "{}",
        ctx()
    );
    let local_port = local.rsplit(':').next().unwrap_or("").to_owned();
    for e in &v {
        assert_eq!(
            e.sent,
            e.back,
            "{}: payload of {} bytes changed",
            ctx(),
            e.size
        );
        assert_eq!(
            e.reply_from,
            target,
            "{}: answer not from the address sent to",
            ctx()
        );
        if addr_header {
            assert_eq!(e.tag, "RAW", "{}", ctx());
            let (ip, port) = e
                .seen
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("{}", ctx()));
            assert_eq!(ip, sender_ip, "{}: the server saw the wrong sender", ctx());
            if sender_port_is_local {
                assert_eq!(port, local_port, "{}: the server saw the wrong port", ctx());
            }
            assert_eq!(e.seen, v[0].seen, "{}: sender address changed", ctx());
        }
    }
    println!(
        "{tag}: {} echoes ok, server saw {}, rtt ms {:?}",
        v.len(),
        v.first().map(|e| e.seen.as_str()).unwrap_or("-"),
        v.iter().map(|e| e.rtt_ms).collect::<Vec<_>>()
    );
    (local, v)
}

const SIZES: [usize; 6] = [1, 100, 1400, 8000, 60000, 1];

// ---------------------------------------------------------------------------------------
// 1. request/response
// ---------------------------------------------------------------------------------------

/// Request/response with unmodified programs in every pattern: p2 plain, p2 GCB and b1 GCB
/// to servers in a1 (python recvfrom/sendto echo, the examples' `gcb-echo-server --udp`,
/// `socat UDP4-RECVFROM,fork` and `socat UDP4-LISTEN` (connect()s to its first sender));
/// a1 GCB to a GCB server in b1; a1 GCB (unbound and bound, i.e. registered) to a plain
/// server on p1, answered directly and at once.
#[test]
fn request_response_in_every_pattern() {
    let mut rig = Rig::up(&[]);
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    assert!(
        py.starts_with(&format!("{BROKER}:")) && py != format!("{BROKER}:{BROKER_PORT}"),
        "getsockname() of the UDP socket in a1 is not a proxy on the broker: {py}"
    );
    let mut cmd = rig.cmd(
        Host::A1,
        true,
        "gcb-echo-server",
        artifact("gcb-echo-server"),
    );
    cmd.args(["--bind", "0.0.0.0:9001", "--udp"]);
    rig.start(cmd, "gcb-echo-server");
    let ex = rig.out_addr("gcb-echo-server", "listening on ");
    assert!(ex.starts_with(&format!("{BROKER}:")), "examples echo: {ex}");
    let mut cmd = rig.cmd(Host::A1, true, "socat-fork", "socat");
    cmd.args(["-d", "-d", "-b", "65536", "UDP4-RECVFROM:9002,fork", "PIPE"]);
    rig.start(cmd, "socat-fork");
    let mut cmd = rig.cmd(Host::A1, true, "socat-listen", "socat");
    cmd.args(["-d", "-d", "-b", "65536", "UDP4-LISTEN:9003", "PIPE"]);
    rig.start(cmd, "socat-listen");
    let proxy_of = |rig: &Rig, tag: &str, port: u16| -> String {
        let needle = format!("registered udp 10.1.0.11:{port} with broker");
        let log = rig.path(&format!("{tag}.shim.log"));
        let l = wait_line(&log, UP, |l| l.contains(&needle))
            .unwrap_or_else(|| panic!("{tag} did not register udp :{port}\n{}", rig.logs()));
        l.rsplit("proxy ").next().unwrap().trim().to_owned()
    };
    let socat_fork = proxy_of(&rig, "socat-fork", 9002);
    let socat_listen = proxy_of(&rig, "socat-listen", 9003);
    let b1 = rig.echo_server(Host::B1, true, 9000, "echo-b1");
    let p1 = rig.echo_server(Host::P1, false, 9000, "echo-p1");
    assert_eq!(p1, "0.0.0.0:9000");

    // The python echo: payloads and the sender address the server saw.
    for (host, gcb) in [(Host::P2, false), (Host::P2, true), (Host::B1, true)] {
        check_echo(
            &rig,
            (host, gcb),
            &py,
            true,
            &SIZES,
            &[],
            &public_ip(host),
            true,
        );
    }
    // a1 -> b1: both private, through b1's proxy.
    check_echo(
        &rig,
        (Host::A1, true),
        &b1,
        true,
        &SIZES,
        &[],
        &public_ip(Host::A1),
        true,
    );
    // a1 -> p1: a GCB program sending to a plain public server goes direct (p1 is not a
    // proxy), unbound and bound (a registered socket); the first answer comes at once.
    let to_p1 = "203.0.113.10:9000";
    for extra in [&[][..], &["--bind", "9100"][..]] {
        let v = check_echo(
            &rig,
            (Host::A1, true),
            to_p1,
            true,
            &SIZES,
            extra,
            "203.0.113.1",
            false,
        );
        assert!(
            v[0].rtt_ms < 500.0,
            "a1 -> p1 first datagram took {} ms",
            v[0].rtt_ms
        );
    }
    let bound_log = read(&rig.path("client-a1-gcb-203_0_113_10_9000.shim.log"));
    assert!(
        bound_log.contains("registered udp 10.1.0.11:9100 with broker"),
        "the bound a1 client did not register (so the case proves nothing):\n{bound_log}"
    );
    assert!(
        read(&rig.path("echo-p1.out")).contains("RECV 203.0.113.1:9100 "),
        "p1 did not see the bound a1 socket at 203.0.113.1:9100:\n{}",
        read(&rig.path("echo-p1.out"))
    );

    // The examples' echo and socat: raw echoes (gcb-echo-client checks them itself too).
    for (host, gcb) in [(Host::P2, false), (Host::P2, true), (Host::B1, true)] {
        check_echo(&rig, (host, gcb), &ex, false, &SIZES, &[], "", false);
        let mut cmd = rig.cmd(
            host,
            gcb,
            &format!("gcb-echo-client-{host}-{gcb}"),
            artifact("gcb-echo-client"),
        );
        cmd.args([
            &ex,
            "--udp",
            "--size",
            "1400",
            "--count",
            "20",
            "--timeout",
            "3",
        ]);
        let out = rig.run(cmd, RUN);
        let line = text(&out.stdout);
        assert!(
            out.status.success() && line.contains("\"ok\":true") && line.contains("\"echoes\":20"),
            "gcb-echo-client --udp from {host} gcb={gcb}: {line}\n{}\n{}",
            text(&out.stderr),
            rig.logs()
        );
        check_echo(
            &rig,
            (host, gcb),
            &socat_fork,
            false,
            &[1, 1400, 8000, 60000],
            &[],
            "",
            false,
        );
    }
    let socat_log = read(&rig.path("socat-fork.err"));
    for ip in ["203.0.113.11", "203.0.113.2"] {
        assert!(
            socat_log.contains(&format!("receiving packet from AF=2 {ip}:")),
            "socat did not see a sender at {ip}:\n{socat_log}"
        );
    }
    assert!(
        !socat_log.contains("from AF=2 203.0.113.10"),
        "socat saw the proxy as a sender:\n{socat_log}"
    );
    // socat UDP4-LISTEN connect()s to its first sender and then send()/recv()s.
    check_echo(
        &rig,
        (Host::B1, true),
        &socat_listen,
        false,
        &[1, 1400, 8000, 60000],
        &[],
        "",
        false,
    );

    // The servers in a1 saw nothing but the clients' datagrams.
    let a1 = read(&rig.path("echo-a1.out"));
    let recv: Vec<&str> = a1.lines().filter(|l| l.starts_with("RECV")).collect();
    assert_eq!(recv.len(), 3 * SIZES.len(), "echo-a1:\n{a1}");
    rig.assert_alive();
    let st = rig.broker_stats();
    assert!(st["udp_to_listener"] >= 3 * SIZES.len() as u64, "{st:?}");
    assert_eq!(st["udp_drop_too_big"], 0, "{st:?}");
}

// ---------------------------------------------------------------------------------------
// 2. iperf3 -u
// ---------------------------------------------------------------------------------------

/// (error, packets, lost_percent) of an `iperf3 -u -J` client report (`end.sum`).
fn iperf_udp_summary(json: &[u8]) -> Result<(String, f64, f64), String> {
    let d: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("cannot read iperf3 JSON ({e})"))?;
    let end = &d["end"];
    let sum = if end["sum"].is_object() {
        &end["sum"]
    } else {
        &end["sum_received"]
    };
    let num = |k: &str| sum[k].as_f64().unwrap_or(-1.0);
    let err = d["error"].as_str().unwrap_or("").to_owned();
    Ok((err, num("packets"), num("lost_percent")))
}

/// iperf3 -u: the server in a1 under GCB (TCP control and UDP data socket share the proxy
/// port), clients p2 plain and b1 under GCB, each twice in a row on the same proxy port.
#[test]
fn iperf3_udp_through_the_broker_twice() {
    let mut rig = Rig::up(&[]);
    let mut cmd = rig.cmd(Host::A1, true, "iperf3-server", "iperf3");
    cmd.args(["-s", "-4", "-p", "5201"]);
    rig.start(cmd, "iperf3-server");
    let slog = rig.path("iperf3-server.shim.log");
    let line = wait_line(&slog, UP, |l| {
        l.contains("registered 10.1.0.11:5201 with broker")
    })
    .unwrap_or_else(|| panic!("iperf3 server did not register\n{}", rig.logs()));
    let proxy = line.rsplit("proxy ").next().unwrap().trim().to_owned();
    let (ip, port) = proxy.split_once(':').unwrap();
    assert_eq!(ip, BROKER, "{line}");
    let mut packets_total = 0.0;
    for round in 0..2 {
        for (host, gcb) in [(Host::P2, false), (Host::B1, true)] {
            let tag = format!("iperf3-{host}-{gcb}-{round}");
            let mut cmd = rig.cmd(host, gcb, &tag, "iperf3");
            cmd.args([
                "-4", "-u", "-b", "100M", "-c", ip, "-p", port, "-t", "2", "-J",
            ]);
            let out = rig.run(cmd, RUN);
            let summary = iperf_udp_summary(&out.stdout);
            let ok = matches!(&summary, Ok((e, p, l)) if e.is_empty() && *p > 0.0 && (0.0..5.0).contains(l));
            assert!(
                out.status.success() && ok,
                "{tag}: status {:?} summary {summary:?}\nstdout {}\nstderr {}\n{}",
                out.status,
                text(&out.stdout),
                text(&out.stderr),
                rig.logs()
            );
            let (_, packets, lost) = summary.unwrap();
            println!("{tag}: {packets} packets, {lost}% lost");
            packets_total += packets;
        }
    }
    // The UDP data socket registered on the same port, and the datagrams went through the
    // proxy (not some other path).
    let shim = read(&slog);
    assert!(
        shim.contains(&format!(
            "registered udp 10.1.0.11:5201 with broker {BROKER}:{BROKER_PORT}: proxy {proxy}"
        )),
        "the UDP socket did not get the TCP proxy port {proxy}:\n{shim}"
    );
    rig.assert_alive();
    let st = rig.broker_stats();
    assert!(
        st["udp_to_listener"] as f64 >= packets_total * 0.95,
        "{packets_total} packets, but {st:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. loss
// ---------------------------------------------------------------------------------------

/// Streams `n` numbered, self-hashed datagrams from `host` to `target` and checks every
/// answer: intact, one of ours, not twice, seen from `sender_ip`. Returns how many came back.
fn check_stream(
    rig: &Rig,
    (host, gcb): (Host, bool),
    target: &str,
    n: usize,
    sender_ip: &str,
) -> usize {
    let tag = format!("stream-{host}{}", if gcb { "-gcb" } else { "" });
    let out = rig.client(
        host,
        gcb,
        &tag,
        &["stream".into(), target.into(), n.to_string()],
    );
    let stdout = text(&out.stdout);
    let ctx = || {
        format!(
            "{tag}: status {:?}\nstderr {}\n{}",
            out.status,
            text(&out.stderr),
            rig.logs()
        )
    };
    assert!(out.status.success(), "{}", ctx());
    let mut sent = HashMap::new();
    let mut got = BTreeSet::new();
    let mut local = String::new();
    for l in stdout.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w[..] {
            ["LOCAL", a] => local = a.to_owned(),
            ["SENT", seq, sha] => {
                sent.insert(seq.to_owned(), sha.to_owned());
            }
            ["REPLY", from, seen, tag, seq, sha] => {
                assert_eq!(from, target, "{l}: answer not from the proxy\n{}", ctx());
                assert_eq!(
                    tag,
                    "OK",
                    "{l}: the server got a corrupted datagram\n{}",
                    ctx()
                );
                assert_eq!(
                    sent.get(seq).map(String::as_str),
                    Some(sha),
                    "{l}: not what was sent\n{}",
                    ctx()
                );
                let (ip, port) = seen.rsplit_once(':').unwrap();
                assert_eq!(ip, sender_ip, "{l}: misaddressed\n{}", ctx());
                assert_eq!(
                    port,
                    local.rsplit(':').next().unwrap(),
                    "{l}: misaddressed\n{}",
                    ctx()
                );
                assert!(
                    got.insert(seq.to_owned()),
                    "{l}: seq {seq} answered twice\n{}",
                    ctx()
                );
            }
            _ => panic!("{tag}: unexpected line {l:?}\n{}", ctx()),
        }
    }
    assert_eq!(sent.len(), n, "{}", ctx());
    println!("{tag}: {} of {n} answers, all intact", got.len());
    got.len()
}

/// 30 % loss on both gateways: datagrams are lost, but nothing the server or the clients
/// receive is corrupted, duplicated or misaddressed, and a reasonable share arrives.
#[test]
fn loss_on_the_gateways_loses_but_never_corrupts_duplicates_or_misaddresses() {
    let mut rig = Rig::up(&[]);
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    // Registered and working before the loss starts.
    check_echo(
        &rig,
        (Host::P2, false),
        &py,
        true,
        &[100],
        &[],
        "203.0.113.11",
        true,
    );
    rig.lab.loss(Host::Gwa, 30);
    rig.lab.loss(Host::Gwb, 30);
    const N: usize = 300;
    // p2 -> a1: each round trip crosses gwa twice (0.7^2 = 49 % expected).
    let p2 = check_stream(&rig, (Host::P2, false), &py, N, "203.0.113.11");
    // b1 -> a1: gwb and gwa, twice each (0.7^4 = 24 %).
    let b1 = check_stream(&rig, (Host::B1, true), &py, N, "203.0.113.2");
    assert!(p2 >= N / 4, "p2: only {p2} of {N} answers at 30 % loss");
    assert!(b1 >= N / 10, "b1: only {b1} of {N} answers at 30 % loss");
    // The server: every datagram intact, none twice.
    let out = read(&rig.path("echo-a1.out"));
    let mut seen = BTreeSet::new();
    let mut n = 0;
    for l in out.lines().filter(|l| l.starts_with("RECV")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert_ne!(w[4], "BAD", "server got a corrupted datagram: {l}");
        assert!(
            w[1].starts_with("203.0.113.11:") || w[1].starts_with("203.0.113.2:"),
            "{l}"
        );
        assert!(
            seen.insert((w[1].to_owned(), w[3].to_owned())),
            "server got a datagram twice: {l}"
        );
        n += 1;
    }
    assert!(
        n > p2 + b1,
        "the server received {n}, fewer than answered {}",
        p2 + b1
    );
    rig.lab.loss(Host::Gwa, 0);
    rig.lab.loss(Host::Gwb, 0);
    check_echo(
        &rig,
        (Host::B1, true),
        &py,
        true,
        &SIZES,
        &[],
        "203.0.113.2",
        true,
    );
    rig.assert_alive();
}

// ---------------------------------------------------------------------------------------
// 4. bad input
// ---------------------------------------------------------------------------------------

/// A GCBU frame: magic, kind, IPv4, port (big endian), payload.
fn frame(kind: u8, ip: [u8; 4], port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = b"GCBU".to_vec();
    f.push(kind);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn send_hex(rig: &Rig, host: Host, tag: &str, target: &str, datagrams: &[Vec<u8>], extra: &[&str]) {
    let mut args = vec!["send".to_owned(), target.to_owned()];
    args.extend(datagrams.iter().map(|d| hex(d)));
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = rig.client(host, false, tag, &args);
    assert!(out.status.success(), "{tag}: {out:?}");
}

/// Forged and stray datagrams: GCBU frames sent to the proxy by a stranger (Dummy with a
/// wrong or no token, From, DummyAck, a To that would make the broker send to p2) are
/// dropped and counted by the broker; datagrams that merely look like frames (too short,
/// unknown kind) and random bytes are ordinary data and reach the program intact; a
/// datagram too big to wrap is dropped and counted; junk sent to the listener's public
/// data address and a forged From frame sent by a LAN neighbour straight to the program's
/// socket never reach the program as what they claim. The program receives exactly the
/// legitimate datagrams, with the right sender; nothing crashes.
#[test]
fn forged_and_stray_datagrams_never_reach_the_program_as_frames() {
    let mut rig = Rig::up(&[]);
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    let mut legit: Vec<String> = Vec::new();
    let v = check_echo(
        &rig,
        (Host::P2, false),
        &py,
        true,
        &[10],
        &[],
        "203.0.113.11",
        true,
    );
    legit.extend(v.iter().map(|e| e.sent.clone()));
    let needle = format!("udp proxy {py}: listener data address ");
    let line = wait_line(&rig.path("broker.log"), UP, |l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no data address for {py}\n{}", rig.logs()));
    let data_addr = line
        .split(&needle)
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(data_addr.starts_with("203.0.113.1:"), "{line}");

    // p2 listens on 7777 for anything a forged To frame would make the broker send there.
    let mut listen = rig.cmd(Host::P2, false, "p2-listen", python());
    listen
        .arg("-u")
        .arg(rig.path("client.py"))
        .args(["listen", "7777", "6"]);
    rig.start(listen, "p2-listen");
    wait_line(&rig.path("p2-listen.out"), UP, |l| l == "LISTENING").expect("p2 listens");

    let forged = [
        frame(b'D', [0; 4], 0, b"0123456789abcdef0123456789abcdef"), // wrong token
        frame(b'D', [0; 4], 0, b""),                                 // no token
        frame(b'F', [6, 6, 6, 6], 666, b"FORGED-F"),
        frame(b'A', [203, 0, 113, 11], 7777, b"FORGED-A"),
        frame(b'T', [203, 0, 113, 11], 7777, b"REFLECT"),
    ];
    let mut ordinary = vec![
        b"GCBU".to_vec(),                              // shorter than a frame header
        frame(b'X', [1, 2, 3, 4], 5, b"unknown kind"), // not a frame kind
    ];
    for n in [1, 500, 3000, 20000] {
        ordinary.push(random_bytes(n));
    }
    let mut all = forged.to_vec();
    all.extend(ordinary.iter().cloned());
    all.extend(forged.iter().cloned());
    send_hex(&rig, Host::P2, "p2-junk", &py, &all, &["zeros:65500"]);
    legit.extend(ordinary.iter().map(|d| sha256(d)));
    // Junk at the listener's public data address: the NAT drops it, or the shim must.
    let direct = [
        frame(b'F', [6, 6, 6, 6], 666, b"FORGED-DIRECT"),
        frame(b'A', [0; 4], 0, b"0123456789abcdef0123456789abcdef"),
        random_bytes(100),
    ];
    send_hex(&rig, Host::P2, "p2-direct", &data_addr, &direct, &[]);
    send_hex(&rig, Host::P1, "p1-direct", &data_addr, &direct, &[]);
    // A LAN neighbour reaches the program's real socket: a forged From frame must not be
    // taken for a relayed datagram; ordinary datagrams are served directly.
    send_hex(
        &rig,
        Host::A2,
        "a2-forged",
        "10.1.0.11:9000",
        &direct[..2],
        &[],
    );
    let v = check_echo(
        &rig,
        (Host::A2, false),
        "10.1.0.11:9000",
        true,
        &[1, 1400],
        &[],
        "10.1.0.12",
        true,
    );
    legit.extend(v.iter().map(|e| e.sent.clone()));
    // And the relay still serves.
    for (host, gcb) in [(Host::P2, false), (Host::B1, true)] {
        let v = check_echo(
            &rig,
            (host, gcb),
            &py,
            true,
            &SIZES,
            &[],
            &public_ip(host),
            true,
        );
        legit.extend(v.iter().map(|e| e.sent.clone()));
    }
    thread::sleep(Duration::from_millis(300));

    let out = read(&rig.path("echo-a1.out"));
    let mut got: Vec<String> = Vec::new();
    for l in out.lines().filter(|l| l.starts_with("RECV")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert!(
            ["203.0.113.11:", "203.0.113.2:", "10.1.0.12:"]
                .iter()
                .any(|p| w[1].starts_with(p)),
            "the program got a datagram from {}: {l}\n{}",
            w[1],
            rig.logs()
        );
        got.push(w[3].to_owned());
    }
    // The a2 frames came from a2 itself, not through the proxy: forged relay frames,
    // dropped by the shim (and counted), never delivered, and never unwrapped as the
    // datagram of 6.6.6.6:666 they claim to carry.
    for f in &direct[..2] {
        let sha = sha256(f);
        assert!(
            !got.contains(&sha),
            "a forged frame from a2 reached the program:\n{out}"
        );
        let inner = sha256(&f[11..]);
        assert!(
            !got.contains(&inner),
            "a forged frame from a2 was unwrapped:\n{out}"
        );
    }
    got.sort();
    legit.sort();
    assert_eq!(
        got, legit,
        "the program must get exactly the legitimate datagrams:\n{out}"
    );
    let p2_listen = read(&rig.path("p2-listen.out"));
    assert!(
        !p2_listen.contains("GOT"),
        "a forged To frame was relayed to p2:\n{p2_listen}"
    );
    rig.assert_alive();
    let st = rig.broker_stats();
    println!(
        "broker udp counters: {:?}",
        st.iter()
            .filter(|(k, _)| k.starts_with("udp"))
            .collect::<BTreeMap<_, _>>()
    );
    assert!(
        st["udp_drop_bad_token"] >= 4,
        "two forged Dummies, twice: {st:?}"
    );
    assert!(
        st["udp_drop_stray"] >= 6,
        "F, A and T frames from p2, twice: {st:?}"
    );
    assert!(st["udp_drop_too_big"] >= 1, "{st:?}");
    assert_eq!(
        st["udp_from_listener"], st["udp_to_listener"],
        "one answer per datagram relayed: {st:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. relay rule expiry
// ---------------------------------------------------------------------------------------

/// With `--udp-rule-idle-ms 1500`, a sender that pauses 3 s loses its relay rule and gets a
/// new one when it talks again (same socket, same address seen); an answer the program
/// sends after the rule expired is not delivered (the broker sends only to live senders)
/// and is counted.
#[test]
fn relay_rules_expire_and_resume() {
    let mut rig = Rig::up(&["--udp-rule-idle-ms", "1500"]);
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    let sizes = [100, 1400, 8000, 100, 1400, 8000];
    for (host, gcb) in [(Host::P2, false), (Host::B1, true)] {
        let v = check_echo(
            &rig,
            (host, gcb),
            &py,
            true,
            &sizes,
            &["--pause", "3", "3"],
            &public_ip(host),
            true,
        );
        let sender = &v[0].seen;
        let log = rig.broker_log();
        let created = log
            .lines()
            .filter(|l| l.ends_with(&format!("relay rule for {sender}")))
            .count();
        let expired = log
            .lines()
            .filter(|l| l.ends_with(&format!("relay rule for {sender} expired")))
            .count();
        assert!(
            created >= 2 && expired >= 1,
            "{sender}: {created} rules created, {expired} expired:\n{log}"
        );
    }
    let out = rig.client(Host::P2, false, "late", &["late".into(), py.clone()]);
    let t = text(&out.stdout);
    assert!(
        t.contains(&format!("FIRST {py} True")),
        "late: {t}\n{}",
        rig.logs()
    );
    assert!(
        t.contains("NOTHING-MORE"),
        "an answer after the rule expired was delivered: {t}"
    );
    rig.assert_alive();
    let st = rig.broker_stats();
    assert!(st["udp_rules_expired"] >= 2, "{st:?}");
    assert!(st["udp_rules_created"] >= 4, "{st:?}");
    assert!(st["udp_drop_no_rule"] >= 1, "the late answer: {st:?}");
}

// ---------------------------------------------------------------------------------------
// 6. readiness
// ---------------------------------------------------------------------------------------

/// Two blocking UDP sockets (ports P and P+1) served from one readiness loop: `select`,
/// `poll` or `epoll` (argv[2]). For every socket reported readable it calls recvfrom()
/// once (blocking, as such programs do: readable means a datagram is there) and echoes
/// like `ECHO`. Prints `ADDR IP:PORT` for both sockets.
const MUX: &str = include_str!("programs/udp_mux.py");

/// Starts `MUX` (written to mux.py) under GCB in a1 on `port` and `port + 1`, waiting
/// with `how`; returns its tag and the two addresses it printed (proxies).
fn start_mux(rig: &mut Rig, how: &str, port: u16) -> (String, Vec<String>) {
    let tag = format!("mux-{how}");
    let mut cmd = rig.cmd(Host::A1, true, &tag, python());
    cmd.arg("-u")
        .arg(rig.path("mux.py"))
        .arg(port.to_string())
        .arg(how);
    rig.start(cmd, &tag);
    let out = rig.path(&format!("{tag}.out"));
    let mut addrs = Vec::new();
    let deadline = Instant::now() + UP;
    while addrs.len() < 2 && Instant::now() < deadline {
        addrs = read(&out)
            .lines()
            .filter_map(|l| l.strip_prefix("ADDR "))
            .map(str::to_owned)
            .collect();
        thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(addrs.len(), 2, "{tag}: {}\n{}", read(&out), rig.logs());
    (tag, addrs)
}

/// select/poll/epoll servers with two registered UDP sockets: readiness must mean a
/// datagram for the program (the shim's own DummyAcks must not make a socket readable and
/// then block the program in recvfrom()), so each socket is served independently and at
/// once, in both orders, also across a keepalive.
#[test]
fn select_poll_epoll_servers_serve_each_socket_at_once() {
    let mut rig = Rig::up(&[]);
    fs::write(rig.path("mux.py"), MUX).unwrap();
    let mut targets = Vec::new();
    for (i, how) in ["select", "poll", "epoll"].into_iter().enumerate() {
        let (tag, addrs) = start_mux(&mut rig, how, 9000 + 10 * i as u16);
        targets.push((tag, addrs));
    }
    // Control: the same program without GCB (in a2, reached from a1 on the LAN) serves
    // both sockets at once.
    let mut cmd = rig.cmd(Host::A2, false, "mux-plain", python());
    cmd.arg("-u")
        .arg(rig.path("mux.py"))
        .args(["9000", "select"]);
    rig.start(cmd, "mux-plain");
    rig.lab.wait_for_udp_bind(Host::A2, 9001, UP).unwrap();
    for target in ["10.1.0.12:9001", "10.1.0.12:9000"] {
        check_echo(
            &rig,
            (Host::A1, false),
            target,
            true,
            &[1, 1400],
            &[],
            "10.1.0.11",
            true,
        );
    }
    // Let the DummyAcks arrive before the first datagram.
    thread::sleep(Duration::from_millis(500));
    let mut failures = Vec::new();
    for round in 0..2 {
        for (tag, addrs) in &targets {
            // The second socket first: a program blocked on the first would never answer.
            for target in [&addrs[1], &addrs[0]] {
                let ctag = format!("{tag}-{round}-{}", target.replace([':', '.'], "_"));
                let args = ["echo", target, "ADDR", "1", "1400"].map(String::from);
                let out = rig.client(Host::P2, false, &ctag, &args);
                let t = text(&out.stdout);
                let ok = t.lines().filter(|l| l.starts_with("ECHO ")).count() == 2
                    && t.lines().filter(|l| l.starts_with("ECHO ")).all(|l| {
                        let w: Vec<&str> = l.split_whitespace().collect();
                        w[2] == w[3] && w[4] == target && w[5].starts_with("203.0.113.11:")
                    });
                println!("{ctag}: {}", if ok { "ok" } else { "FAILED" });
                if !ok {
                    failures.push(format!("{tag} round {round} socket {target}: {t}"));
                }
            }
        }
        if round == 0 {
            // Past a keepalive Dummy (10-15 s after registering) and its DummyAck.
            thread::sleep(Duration::from_secs(16));
        }
    }
    assert!(
        failures.is_empty(),
        "sockets not served:\n{}\n{}",
        failures.join("\n"),
        rig.logs()
    );
    rig.assert_alive();
    let st = rig.broker_stats();
    assert!(
        st["udp_dummies"] >= 12,
        "6 sockets, a keepalive each: {st:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. GCB <-> GCB hole punching (paper 4.2.1)
// ---------------------------------------------------------------------------------------

/// A GCB client in b1 for [`punch_frames_never_block_mux_servers`]: one echo on the first
/// address (which starts a punch), a second of waiting inside select() (the punch's
/// Dummies reach the server meanwhile), then an echo on the second address and another on
/// the first, each with a 3 s timeout. Prints `OK n`/`TIMEOUT n`/`BAD n`.
const PUNCH_THEN_OTHER: &str = include_str!("programs/udp_punch_then_other.py");

/// select/poll/epoll servers with two blocking registered UDP sockets, and a GCB client
/// that punches to the first: the client's punch Dummies reach the server's first socket
/// while the server waits. They must not make that socket readable (the server would then
/// block in recvfrom() on it, and never answer on the second socket).
#[test]
fn punch_frames_never_block_mux_servers() {
    let mut rig = Rig::up(&[]);
    cpe_gateways(&rig);
    fs::write(rig.path("mux.py"), MUX).unwrap();
    fs::write(rig.path("punch_then_other.py"), PUNCH_THEN_OTHER).unwrap();
    let mut failures = Vec::new();
    for (i, how) in ["select", "poll", "epoll"].into_iter().enumerate() {
        let (tag, addrs) = start_mux(&mut rig, how, 9000 + 10 * i as u16);
        let ctag = format!("punch-{how}");
        let mut cmd = rig.cmd(Host::B1, true, &ctag, python());
        cmd.arg("-u").arg(rig.path("punch_then_other.py")).args([
            &addrs[0],
            &addrs[1],
            &(9100 + i).to_string(),
        ]);
        let o = rig.run(cmd, RUN);
        let t = text(&o.stdout);
        println!("{ctag}: {}", t.trim().replace('\n', ", "));
        if t.trim() != "OK 0\nOK 1\nOK 2" || !o.status.success() {
            failures.push(format!("{how}: {t}{}", text(&o.stderr)));
        }
        let shim = read(&rig.path(&format!("{tag}.shim.log")));
        assert!(
            shim.contains("punch: DummyAck from 203.0.113.2:"),
            "{how}: the server never punched, so this test showed nothing:\n{}",
            rig.logs()
        );
    }
    assert!(
        failures.is_empty(),
        "servers blocked by punch frames:\n{}\n{}",
        failures.join("\n"),
        rig.logs()
    );
    rig.assert_alive();
}

/// Median of the echo round trips from the `skip`-th on, in ms.
fn median_rtt(v: &[Echo], skip: usize) -> f64 {
    let mut r: Vec<f64> = v.iter().skip(skip).map(|e| e.rtt_ms).collect();
    r.sort_by(|a, b| a.total_cmp(b));
    r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Makes gwa and gwb drop new UDP from the public segment addressed to themselves, as
/// home routers do. The lab's gateways accept such packets (port unreachable), and the
/// conntrack entry that creates on the far gateway makes its masquerade pick another
/// port for the peer's own opening packet: a punch then works only when both sides'
/// first Dummies cross in flight (a race that parallel tests on two cores often lose).
fn cpe_gateways(rig: &Rig) {
    rig.lab.cpe(true);
}

/// The shim log of the python client `check_echo` ran in `host` toward `target`.
fn client_log(rig: &Rig, host: Host, target: &str) -> String {
    read(&rig.path(&format!(
        "client-{host}-gcb-{}.shim.log",
        target.replace([':', '.'], "_")
    )))
}

/// A GCB program in a1 with a socket bound to port 0 (`LAZY`): echoes with a public
/// server first (`ECHO ok|BAD n`), prints `TALKED`, waits for the file argv[2], then asks
/// for its address (`LOCAL ip:port`) and echoes one datagram it receives (`SERVED n`).
const LAZY: &str = include_str!("programs/udp_lazy.py");

/// A socket bound to port 0 registers only when its address matters: talking to a public
/// host, it is a plain socket (no registration, the public server sees its NAT mapping);
/// getsockname() then registers it and returns a proxy that a plain sender can reach; and
/// a port-0 socket's first datagram to another registration's proxy registers it first,
/// so it punches.
#[test]
fn port_zero_udp_sockets_register_when_needed() {
    let mut rig = Rig::up(&[]);
    cpe_gateways(&rig);
    rig.echo_server(Host::P2, false, 9500, "echo-p2");
    let public = "203.0.113.11:9500";
    fs::write(rig.path("lazy.py"), LAZY).unwrap();
    let trigger = rig.path("lazy.go");
    let mut cmd = rig.cmd(Host::A1, true, "lazy", python());
    cmd.arg("-u")
        .arg(rig.path("lazy.py"))
        .arg(public)
        .arg(&trigger);
    rig.start(cmd, "lazy");
    let out = rig.path("lazy.out");
    assert!(
        wait_line(&out, RUN, |l| l == "TALKED").is_some(),
        "{}\n{}",
        read(&out),
        rig.logs()
    );
    assert_eq!(
        read(&out)
            .lines()
            .filter(|l| l.starts_with("ECHO ok"))
            .count(),
        3,
        "{}\n{}",
        read(&out),
        rig.logs()
    );
    let seen: Vec<String> = read(&rig.path("echo-p2.out"))
        .lines()
        .filter(|l| l.starts_with("RECV "))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert!(
        seen.len() == 3 && seen.iter().all(|a| a.starts_with("203.0.113.1:")),
        "the public server should see a1's NAT mapping: {seen:?}"
    );
    assert!(
        !rig.broker_log().contains("registered udp socket"),
        "a port-0 socket that only talked to a public host registered:\n{}",
        rig.logs()
    );
    fs::write(&trigger, b"").unwrap();
    let proxy = rig.out_addr("lazy", "LOCAL ");
    assert!(
        proxy.starts_with(&format!("{BROKER}:")) && proxy != format!("{BROKER}:{BROKER_PORT}"),
        "getsockname() did not register: {proxy}\n{}",
        rig.logs()
    );
    let v = check_echo(
        &rig,
        (Host::P2, false),
        &proxy,
        true,
        &[1400],
        &[],
        "203.0.113.11",
        true,
    );
    assert_eq!(v.len(), 1);
    assert!(
        wait_line(&out, UP, |l| l == "SERVED 1400").is_some(),
        "{}",
        read(&out)
    );

    // A port-0 socket in b1 to a GCB server's proxy in a1: its first datagram starts its
    // registration (answered while it waits for the echo), so it punches; the client's
    // getsockname() right after that first sendto() (its LOCAL line) waits for the
    // registration and returns the proxy.
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    let mut sizes = vec![1, 1400];
    sizes.extend([1024; 10]);
    let (local, _) = check_echo_local(
        &rig,
        (Host::B1, true),
        (&py, true, &sizes, &["--bind", "0", "--pause", "1.5", "2"]),
        "203.0.113.2",
        false,
    );
    let registered = client_log(&rig, Host::B1, &py)
        .lines()
        .find_map(|l| {
            l.split("registered udp 10.2.0.11:")
                .nth(1)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    assert!(
        registered.ends_with(&format!("proxy {local}")) && local.starts_with(BROKER),
        "the port-0 socket in b1: getsockname() {local}, registration {registered:?}\n{}",
        rig.logs()
    );
    assert!(
        client_log(&rig, Host::B1, &py).contains("punch: DummyAck from 203.0.113.1:9000: direct"),
        "the port-0 socket did not punch:\n{}",
        rig.logs()
    );
    rig.assert_alive();
}

/// Binds a UDP socket to port 0 (so it is not registered yet), execs itself with the
/// socket kept open, and in the new image prints `AFTER ip:port` (getsockname()) and
/// echoes one datagram (`SERVED n`).
const PENDING_EXEC: &str = include_str!("programs/udp_pending_exec.py");

/// A port-0 socket that has not registered yet is handed across exec as such: the new
/// image registers it at its first getsockname(), and a plain sender reaches it there.
#[test]
fn pending_udp_socket_registers_after_exec() {
    let mut rig = Rig::up(&[]);
    fs::write(rig.path("pending_exec.py"), PENDING_EXEC).unwrap();
    let mut cmd = rig.cmd(Host::A1, true, "pending-exec", python());
    cmd.arg("-u").arg(rig.path("pending_exec.py"));
    rig.start(cmd, "pending-exec");
    let proxy = rig.out_addr("pending-exec", "AFTER ");
    assert!(
        proxy.starts_with(&format!("{BROKER}:")) && proxy != format!("{BROKER}:{BROKER_PORT}"),
        "the exec'd image's getsockname() is not a proxy: {proxy}\n{}",
        rig.logs()
    );
    let shim = read(&rig.path("pending-exec.shim.log"));
    assert!(
        shim.contains("inherited pending udp fd"),
        "not handed over as pending:\n{}",
        rig.logs()
    );
    check_echo(
        &rig,
        (Host::P2, false),
        &proxy,
        true,
        &[1400],
        &[],
        "203.0.113.11",
        true,
    );
    let out = rig.path("pending-exec.out");
    assert!(
        wait_line(&out, UP, |l| l == "SERVED 1400").is_some(),
        "{}",
        read(&out)
    );
    assert_eq!(
        rig.broker_log().matches("registered udp socket").count(),
        1,
        "{}",
        rig.logs()
    );
    rig.assert_alive();
}

/// GCB to GCB over UDP (issue 5, paper 4.2.1): b1 and a1, behind two different NATs
/// (home-router-like: see `cpe_gateways`), both under GCB with registered (bound) sockets. The first datagram goes through the
/// relay; the shims punch through both NATs (Dummy/DummyAck with the broker's nonce) and
/// the bulk goes direct: every datagram comes back intact, from the address it was sent
/// to, the server always sees the same sender address (b1's NAT mapping, relayed or
/// direct), and the broker relayed at most 20 of the 214 datagrams each way (its
/// counters; the second exchange has no pause, so most of its 8 may be relayed).
/// Then a LAN neighbour (a2) sends forged punch frames (Dummy/DummyAck with a wrong
/// nonce, From frames claiming to be b1) straight to a1's socket: none reaches the
/// program, and a second exchange still works directly.
#[test]
fn gcb_to_gcb_udp_punches_through_both_nats_and_drops_forged_punch_frames() {
    let mut rig = Rig::up(&[]);
    cpe_gateways(&rig);
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    let mut sizes: Vec<usize> = SIZES.to_vec();
    sizes.extend(std::iter::repeat_n(1024, 200));
    // A pause after the first datagrams: the punch window (Dummies every 100 ms) must
    // be able to end before the bulk; in the lab a whole echo takes ~0.1 ms.
    let bind = ["--bind", "9100", "--pause", "1.5", "6"];
    let v = check_echo(
        &rig,
        (Host::B1, true),
        &py,
        true,
        &sizes,
        &bind,
        "203.0.113.2",
        false,
    );
    // getsockname() of b1's socket is its proxy; the server sees its NAT mapping (the
    // lab's masquerade keeps the port), relayed or direct.
    assert_eq!(v[0].seen, "203.0.113.2:9100");
    let b1_log = client_log(&rig, Host::B1, &py);
    assert!(
        b1_log.contains("punch: DummyAck from 203.0.113.1:9000: direct"),
        "b1 did not punch through to a1's NAT mapping:\n{}",
        rig.logs()
    );
    let a1_log = read(&rig.path("echo-a1.shim.log"));
    assert!(
        a1_log.contains("punch: DummyAck from 203.0.113.2:9100: direct"),
        "a1 did not punch through to b1's NAT mapping:\n{}",
        rig.logs()
    );
    println!(
        "b1 -> a1 GCB/GCB udp echo, median rtt: first 5 {:.3} ms, after the punch {:.3} ms",
        median_rtt(&v[..5], 0),
        median_rtt(&v, 10)
    );

    // Forged punch frames from a LAN neighbour straight to a1's socket.
    let before = read(&rig.path("echo-a1.out"))
        .lines()
        .filter(|l| l.starts_with("RECV"))
        .count();
    let forged = [
        frame(b'D', [0; 4], 0, b"0123456789abcdef0123456789abcdef"),
        frame(b'A', [0; 4], 0, b"0123456789abcdef0123456789abcdef"),
        frame(b'A', [0; 4], 0, b"short"),
        frame(b'F', [203, 0, 113, 2], 9100, b"FORGED-FROM-B1"),
        frame(b'F', [203, 0, 113, 10], 9100, b"FORGED-FROM-PROXY"),
    ];
    send_hex(&rig, Host::A2, "forger-a2", "10.1.0.11:9000", &forged, &[]);
    thread::sleep(Duration::from_millis(500));
    let after: Vec<String> = read(&rig.path("echo-a1.out"))
        .lines()
        .filter(|l| l.starts_with("RECV"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        after.len(),
        before,
        "forged punch frames reached the program: {:?}\n{}",
        &after[before..],
        rig.logs()
    );
    let v2 = check_echo(
        &rig,
        (Host::B1, true),
        &py,
        true,
        &[1, 1400, 60000, 1024, 1024, 1024, 1024, 1024],
        &bind,
        "203.0.113.2",
        false,
    );
    assert_eq!(
        v2[0].seen, v[0].seen,
        "the server saw b1 at another address"
    );
    // A plain program now sends from the same b1 address (the punched client exited):
    // it reaches a1 through the relay from the address a1's direct record names. a1
    // must answer through the relay too (the new program knows nothing of the punch),
    // not send it GCB frames directly.
    let plain = [1, 1400, 1024, 1024];
    let v3 = check_echo(
        &rig,
        (Host::B1, false),
        &py,
        true,
        &plain,
        &["--bind", "9100"],
        "203.0.113.2",
        true,
    );
    assert_eq!(
        v3[0].seen, v[0].seen,
        "the server saw b1 at another address"
    );
    rig.assert_alive();
    let total = (sizes.len() + 8 + plain.len()) as u64;
    let st = rig.broker_stats();
    println!("broker: {st:?}");
    assert!(st["udp_punches"] >= 2, "{st:?}");
    assert!(
        st["udp_to_listener"] >= 1 && st["udp_to_listener"] <= 20,
        "the bulk of the {total} datagrams b1 -> a1 should have gone direct: {st:?}"
    );
    assert!(
        st["udp_from_listener"] <= 20,
        "the bulk of the {total} replies a1 -> b1 should have gone direct: {st:?}"
    );
}

/// A server that answers like `ECHO` (`SENDER RAW\n` + the datagram, printing nothing)
/// and sends on request: `server.py PORT TRIGGER` prints `ADDR IP:PORT`, and whenever the
/// file TRIGGER exists, reads `IP:PORT HEX` from it, removes it, sends the datagram HEX
/// to IP:PORT and prints `SENT IP:PORT`.
const TRIGGERED: &str = include_str!("programs/udp_triggered.py");

/// A punched peer that exits ends the punch (the broker's `punch_end`): a GCB client on
/// b1:9100 punches with a GCB server in a1 and exits; then a plain program that only
/// listens takes b1:9100, and a1's program sends to b1 as it knows it (203.0.113.2:9100,
/// b1's NAT mapping). The plain program must get that datagram intact and bare, from
/// a1's proxy: through the relay, not as a direct GCBU frame from a1's NAT mapping.
#[test]
fn a_punched_peer_that_exits_gets_the_server_datagrams_through_the_relay() {
    let mut rig = Rig::up(&[]);
    cpe_gateways(&rig);
    fs::write(rig.path("server.py"), TRIGGERED).unwrap();
    let trigger = rig.path("trigger");
    let mut cmd = rig.cmd(Host::A1, true, "server-a1", python());
    cmd.arg("-u")
        .arg(rig.path("server.py"))
        .arg("9000")
        .arg(&trigger);
    rig.start(cmd, "server-a1");
    let py = rig.out_addr("server-a1", "ADDR ");
    let mut sizes = vec![1, 100, 1400];
    sizes.extend(std::iter::repeat_n(1024, 20));
    check_echo(
        &rig,
        (Host::B1, true),
        &py,
        true,
        &sizes,
        &["--bind", "9100", "--pause", "1.5", "3"],
        "203.0.113.2",
        false,
    );
    let a1_shim = rig.path("server-a1.shim.log");
    assert!(
        read(&a1_shim).contains("punch: DummyAck from 203.0.113.2:9100: direct")
            && client_log(&rig, Host::B1, &py)
                .contains("punch: DummyAck from 203.0.113.1:9000: direct"),
        "b1 and a1 did not punch through (so the case proves nothing):\n{}",
        rig.logs()
    );
    // The client exited; its broker registration ended with it. Give a1's shim a moment
    // to hear of it (not asserted here: the datagram below is what matters).
    wait_line(&a1_shim, Duration::from_secs(5), |l| {
        l.contains("punch_end")
    });
    let mut listen = rig.cmd(Host::B1, false, "b1-listen", python());
    listen
        .arg("-u")
        .arg(rig.path("client.py"))
        .args(["listen", "9100", "20"]);
    rig.start(listen, "b1-listen");
    wait_line(&rig.path("b1-listen.out"), UP, |l| l == "LISTENING").expect("b1 listens");

    let mut payload = random_bytes(300);
    payload[..4].copy_from_slice(b"DATA");
    let tmp = rig.path("trigger.tmp");
    fs::write(&tmp, format!("203.0.113.2:9100 {}", hex(&payload))).unwrap();
    fs::rename(&tmp, &trigger).unwrap();
    wait_line(&rig.path("server-a1.out"), UP, |l| {
        l == "SENT 203.0.113.2:9100"
    })
    .unwrap_or_else(|| panic!("a1's program did not send\n{}", rig.logs()));
    let got = wait_line(&rig.path("b1-listen.out"), Duration::from_secs(5), |l| {
        l.starts_with("GOT ")
    })
    .unwrap_or_else(|| panic!("b1's new program got nothing\n{}", rig.logs()));
    let w: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(
        w[2..],
        [payload.len().to_string(), sha256(&payload)],
        "b1's new program did not get the bare datagram (a direct GCBU frame would be {} \
         bytes): {got}\n{}",
        payload.len() + 11,
        rig.logs()
    );
    assert_eq!(w[1], py, "not through a1's proxy: {got}\n{}", rig.logs());
    rig.assert_alive();
    let st = rig.broker_stats();
    assert!(st["udp_punches"] >= 1, "{st:?}");
    assert!(st["udp_punch_ends"] >= 1, "{st:?}");
    assert_eq!(st["udp_punch_end_failures"], 0, "{st:?}");
}

/// Same exchange as above with punching blocked (gwb drops UDP from gwa's public
/// address; the broker still reaches both): the punch fails within its window and every
/// datagram goes through the relay, intact and correctly addressed.
#[test]
fn gcb_to_gcb_udp_falls_back_to_the_relay_when_punching_is_blocked() {
    let mut rig = Rig::up(&[]);
    cpe_gateways(&rig);
    let out = rig.lab.sh(
        Host::Gwb,
        "nft add table inet punchblock && \
         nft add chain inet punchblock f '{ type filter hook forward priority -10; policy accept; }' && \
         nft add rule inet punchblock f ip saddr 203.0.113.1 meta l4proto udp counter drop",
        Duration::from_secs(5),
    );
    assert!(out.status.success(), "nft on gwb: {out:?}");
    let py = rig.echo_server(Host::A1, true, 9000, "echo-a1");
    let mut sizes: Vec<usize> = SIZES.to_vec();
    sizes.extend(std::iter::repeat_n(1024, 60));
    let v = check_echo(
        &rig,
        (Host::B1, true),
        &py,
        true,
        &sizes,
        &["--bind", "9100", "--pause", "1.5", "6"],
        "203.0.113.2",
        false,
    );
    println!(
        "b1 -> a1 GCB/GCB udp echo, punching blocked: median rtt {:.3} ms",
        median_rtt(&v, 10)
    );
    let b1_log = client_log(&rig, Host::B1, &py);
    assert!(
        b1_log.contains("punching to") && !b1_log.contains(": direct"),
        "b1 should have tried and failed to punch:\n{b1_log}"
    );
    let nft = rig.lab.sh(
        Host::Gwb,
        "nft list table inet punchblock",
        Duration::from_secs(5),
    );
    let listing = text(&nft.stdout);
    assert!(
        !listing.contains("packets 0 "),
        "the blocking rule dropped nothing (so the case proves nothing):\n{listing}"
    );
    rig.assert_alive();
    let st = rig.broker_stats();
    let n = sizes.len() as u64;
    assert!(st["udp_punches"] >= 1, "{st:?}");
    assert!(st["udp_to_listener"] >= n, "{st:?}");
    assert!(st["udp_from_listener"] >= n, "{st:?}");
}

/// A program's receive timeout (SO_RCVTIMEO) holds under GCB: a blocking recvfrom() on a
/// registered UDP socket and a blocking accept() on a registered listener give up with
/// EAGAIN after the timeout, as without the shim, instead of waiting inside the shim
/// for ever; and a datagram that does come is still delivered.
#[test]
fn receive_timeouts_are_honoured_on_registered_sockets() {
    let rig = Rig::up(&[]);
    let script = include_str!("programs/udp_recv_timeouts.py");
    let mut cmd = rig.cmd(Host::A1, true, "timeouts", python());
    cmd.args(["-u", "-c", script]);
    let out = rig.path("timeouts.out");
    cmd.stdout(File::create(&out).unwrap())
        .stderr(File::create(rig.path("timeouts.err")).unwrap());
    let mut p = rig.lab.spawn(&mut cmd).expect("spawn");
    let proxy_ip = wait_line(&out, UP, |l| l.starts_with("UDP "))
        .unwrap_or_else(|| panic!("no UDP line: {}", read(&rig.path("timeouts.err"))));
    let w: Vec<&str> = proxy_ip.split_whitespace().collect();
    assert_eq!(w[1], BROKER, "registered with the broker: {proxy_ip}");
    let proxy = format!("{}:{}", w[1], w[2]);
    for what in ["recvfrom", "accept"] {
        let line = wait_line(&out, Duration::from_secs(10), |l| l.starts_with(what))
            .unwrap_or_else(|| {
                panic!(
                    "{what} did not return within 10 s (timeout 0.3 s):\n{}\n{}",
                    read(&out),
                    read(&rig.path("timeouts.shim.log"))
                )
            });
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[1], "EAGAIN", "{what}: {line}");
        let secs: f64 = w[2].parse().unwrap();
        assert!((0.25..5.0).contains(&secs), "{what} after {secs} s: {line}");
    }
    // The socket still receives: a plain sender in p2 sends to the proxy.
    let (proxy_host, proxy_port) = proxy.split_once(':').unwrap();
    let mut c = rig.lab.cmd(Host::P2, python());
    c.arg("-c")
        .arg(include_str!("programs/udp_send.py"))
        .args([proxy_host, proxy_port, "late", "3"]);
    assert!(c.status().unwrap().success());
    assert!(
        wait_line(&out, Duration::from_secs(10), |l| l == "GOT late").is_some(),
        "{}",
        read(&out)
    );
    let _ = p.wait_timeout(Duration::from_secs(5));
}

/// Unmodified socat on both sides, both under GCB, across both NATs: socat's UDP4-SENDTO
/// client sends, waits in select() and reads with a blocking recvfrom(), exiting after 1 s
/// of silence (-T1). The two shims punch a hole meanwhile, so the client's socket also
/// receives the peer's Dummy frames: select() must not report those as readable (the
/// blocking recvfrom() would then wait for data that never comes, and socat never exits).
/// Every run must exit by itself with its data echoed intact.
#[test]
fn socat_select_clients_never_stall_on_punch_frames() {
    let mut rig = Rig::up(&[]);
    cpe_gateways(&rig);
    let mut cmd = rig.cmd(Host::A1, true, "socat-srv", "socat");
    cmd.args([
        "-d",
        "-d",
        "UDP4-RECVFROM:7500,reuseaddr,fork",
        "SYSTEM:cat",
    ]);
    rig.start(cmd, "socat-srv");
    let log = rig.path("socat-srv.shim.log");
    let line = wait_line(&log, UP, |l| l.contains("registered udp 10.1.0.11:7500"))
        .unwrap_or_else(|| panic!("server did not register:\n{}", read(&log)));
    let proxy = line.rsplit("proxy ").next().unwrap().trim().to_owned();
    for i in 0..6 {
        let data = gcb_lab::random_bytes(900 + i);
        let input = rig.path(&format!("in-{i}.bin"));
        fs::write(&input, &data).unwrap();
        let mut c = rig.cmd(Host::B1, true, &format!("socat-cli-{i}"), "socat");
        c.args([
            "-T1",
            "-",
            &format!("UDP4-SENDTO:{proxy},bind=0.0.0.0:7501"),
        ])
        .stdin(File::open(&input).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let out = rig
            .lab
            .spawn(&mut c)
            .expect("spawn socat client")
            .capture()
            .finish(Duration::from_secs(20));
        assert!(
            out.status.success(),
            "socat client {i} did not exit by itself: {:?} {}\n{}",
            out.status,
            text(&out.stderr),
            read(&rig.path(&format!("socat-cli-{i}.shim.log")))
        );
        assert_eq!(
            gcb_lab::sha256(&out.stdout),
            gcb_lab::sha256(&data),
            "echo {i} intact"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Exec handoff
// ---------------------------------------------------------------------------------------

/// A daemon that hands its bound UDP socket to an exec'd image (HTCondor-style).
/// `exec_udp.py PORT ECHO_SCRIPT exec|fork`: binds 0.0.0.0:PORT (under GCB it registers),
/// prints `PARENT IP:PORT` (getsockname()), keeps the socket across exec and then
/// * `exec`: also binds a close-on-exec socket on PORT+1 (registered too; printed as
///   `OTHER IP:PORT`), then execs `ECHO_SCRIPT fd=N` in its own place;
/// * `fork`: forks a child that execs `ECHO_SCRIPT fd=N`, keeps its own copy and waits in
///   select() (so its shim runs) until the child exits, prints `CHILD-EXITED`, and then
///   serves the echo itself on the same socket (`ADDR` again, then as `ECHO`).
const EXEC_UDP: &str = include_str!("programs/udp_exec.py");

/// Starts `EXEC_UDP` in a1 under GCB on `port` in `mode`; returns the address the
/// registering image printed.
fn exec_udp_server(rig: &mut Rig, port: u16, mode: &str, tag: &str) -> String {
    fs::write(rig.path("exec_udp.py"), EXEC_UDP).unwrap();
    let mut cmd = rig.cmd(Host::A1, true, tag, python());
    cmd.arg("-u")
        .arg(rig.path("exec_udp.py"))
        .arg(port.to_string())
        .arg(rig.path("echo.py"))
        .arg(mode);
    rig.start(cmd, tag);
    rig.out_addr(tag, "PARENT ")
}

/// How many broker log lines contain `needle`.
fn broker_lines(rig: &Rig, needle: &str) -> usize {
    rig.broker_log()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// A registered UDP socket handed to an exec'd image keeps its registration: the new
/// image reports the same proxy from getsockname(), strips the relay's frames (every
/// payload comes back intact), answers through the relay (replies come from the proxy)
/// and keeps the registration alive on its own: with a 1.5 s lease the registering image
/// heartbeats every 500 ms, and the exec'd image must too (several leases pass before
/// the clients send). The broker sees one registration, no re-registration, no expiry.
/// A close-on-exec registered socket of the same image is not handed over.
#[test]
fn exec_handoff_keeps_the_udp_registration_and_serves() {
    let mut rig = Rig::up(&["--lease-ms", "1500"]);
    let parent = exec_udp_server(&mut rig, 9300, "exec", "udpexec");
    assert!(
        parent.starts_with(&format!("{BROKER}:")),
        "getsockname() before the exec is not a proxy: {parent}"
    );
    let child = rig.out_addr("udpexec", "ADDR ");
    assert_eq!(
        child,
        parent,
        "getsockname() in the exec'd image is not the proxy\n{}",
        rig.logs()
    );
    thread::sleep(Duration::from_secs(4)); // more than two leases
    for (host, gcb) in [(Host::P2, false), (Host::B1, true), (Host::P2, false)] {
        check_echo(
            &rig,
            (host, gcb),
            &parent,
            true,
            &SIZES,
            &[],
            &public_ip(host),
            true,
        );
    }
    // Only the inheritable socket was handed over (the close-on-exec one on 9301 died
    // with the exec), and its token never reached the log.
    let other = rig.out_addr("udpexec", "OTHER ");
    assert!(other.starts_with(&format!("{BROKER}:")), "{other}");
    let shim_log = read(&rig.path("udpexec.shim.log"));
    let inherited: Vec<&str> = shim_log
        .lines()
        .filter(|l| l.contains("inherited udp registration"))
        .collect();
    assert_eq!(inherited.len(), 1, "{shim_log}");
    assert!(
        inherited[0].contains(&format!("(10.1.0.11:9300) as proxy {parent}")),
        "{shim_log}"
    );
    let handoff = shim_log
        .lines()
        .find(|l| l.contains("GCB_INHERIT="))
        .unwrap_or_else(|| panic!("no handoff line:\n{shim_log}"));
    assert!(
        !handoff.contains(":9301") && !handoff.contains(&other) && handoff.contains("<token>"),
        "{handoff}"
    );
    rig.assert_alive();
    assert_eq!(
        broker_lines(&rig, "registered udp socket local 10.1.0.11:9300 "),
        1,
        "{}",
        rig.broker_log()
    );
    assert_eq!(
        broker_lines(&rig, &format!("lease expired: proxy {parent} ")),
        0,
        "{}",
        rig.broker_log()
    );
    for bad in [
        "heartbeat from unknown client",
        "duplicate register",
        "unregistered",
    ] {
        assert_eq!(broker_lines(&rig, bad), 0, "{bad}:\n{}", rig.broker_log());
    }
}

/// fork, then exec in the child, with the parent keeping its copy: both hold the
/// registered socket. The child (the exec'd image) serves; when it closes its copy and
/// exits, the registration stays (the parent still holds the socket) and the parent
/// serves on the same proxy; when the parent, the last holder, closes it, the broker
/// unregisters it at once.
#[test]
fn fork_exec_child_and_parent_share_the_udp_registration() {
    let mut rig = Rig::up(&["--lease-ms", "1500"]);
    let parent = exec_udp_server(&mut rig, 9301, "fork", "udpfork");
    assert!(parent.starts_with(&format!("{BROKER}:")), "{parent}");
    let child = rig.out_addr("udpfork", "ADDR ");
    assert_eq!(child, parent, "the exec'd child's getsockname()");
    thread::sleep(Duration::from_secs(3)); // two leases
    for (host, gcb) in [(Host::P2, false), (Host::B1, true)] {
        check_echo(
            &rig,
            (host, gcb),
            &parent,
            true,
            &SIZES,
            &[],
            &public_ip(host),
            true,
        );
    }
    // The child closes its copy and exits: the parent still holds the socket.
    send_hex(
        &rig,
        Host::P2,
        "quit-child",
        &parent,
        &[b"QUIT".to_vec()],
        &[],
    );
    let out = rig.path("udpfork.out");
    wait_line(&out, UP, |l| l == "CHILD-EXITED")
        .unwrap_or_else(|| panic!("the child did not exit\n{}", rig.logs()));
    let wait_second_addr = Instant::now() + UP;
    while read(&out)
        .lines()
        .filter(|l| l.starts_with("ADDR "))
        .count()
        < 2
    {
        assert!(Instant::now() < wait_second_addr, "{}", read(&out));
        thread::sleep(Duration::from_millis(30));
    }
    let lines: Vec<String> = read(&out)
        .lines()
        .filter(|l| l.starts_with("ADDR "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines[1],
        format!("ADDR {parent}"),
        "the parent's getsockname()"
    );
    thread::sleep(Duration::from_secs(3)); // two leases on the parent's heartbeats alone
    assert_eq!(
        broker_lines(&rig, "unregistered"),
        0,
        "the child's close unregistered the parent's socket:\n{}",
        rig.broker_log()
    );
    check_echo(
        &rig,
        (Host::P2, false),
        &parent,
        true,
        &SIZES,
        &[],
        &public_ip(Host::P2),
        true,
    );
    // The parent, the last holder, closes it: unregistered now, not at lease expiry.
    send_hex(
        &rig,
        Host::P2,
        "quit-parent",
        &parent,
        &[b"QUIT".to_vec()],
        &[],
    );
    let t = Instant::now();
    let line = wait_line(&rig.path("broker.log"), Duration::from_secs(5), |l| {
        l.contains("unregistered proxy")
    })
    .unwrap_or_else(|| panic!("no unregister after the last close\n{}", rig.logs()));
    assert!(
        line.contains(&format!("unregistered proxy {parent} ")),
        "{line}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "unregister was late");
    assert_eq!(broker_lines(&rig, "registered udp socket"), 1);
    for bad in ["lease expired", "heartbeat from unknown client"] {
        assert_eq!(broker_lines(&rig, bad), 0, "{bad}:\n{}", rig.broker_log());
    }
}
