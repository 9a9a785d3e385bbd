//! Issue #10, finding 4 (one host exhausting broker-wide resources) and parts of finding
//! 6 (silent truncation when the broker dies; heartbeat amplification), in the lab.
//!
//! Each test floods the broker on p1 from p2 the way the recipe does, then checks
//! that a LEGITIMATE client on another host still gets its data through, byte for byte.
//! Before the per-IP limits each of them failed (the flood took the broker-wide budget).
//!
//! Recipes that need unauthenticated control datagrams run the broker without a key
//! (`GCB_KEY_FILE` removed, `--insecure --allow 0.0.0.0/0`).
//!
//! `GCB_TEST_BROKERD=/path/to/gcb-brokerd` runs the tests against another broker build
//! (how they were run against the code before the fix).

use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use gcb_lab::{
    brokerd, gcb_run, libgcb, python, random_bytes, read_text as read, sha256, tail, wait_line,
    Broker, Host, Lab, Proc, Scratch,
};

const P1: &str = "203.0.113.10";
const A1: &str = "10.1.0.11";
const UP: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(40);
/// Python helpers, written to the scratch directory. Every mode prints one summary line.
const TOOL: &str = include_str!("programs/seclim_tool.py");

struct Rig {
    dir: Scratch,
    lab: Lab,
}

impl Rig {
    fn up() -> Rig {
        libgcb();
        brokerd();
        let lab = Lab::up();
        let dir = Scratch::new("seclim", &lab);
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::write(dir.join("tool.py"), TOOL).unwrap();
        Rig { dir, lab }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn cmd(&self, host: Host, keyed: bool, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.lab.cmd_keyed(host, keyed, program)
    }

    fn tool(&self, host: Host, args: &[&str]) -> Command {
        let mut c = self.cmd(host, false, python());
        c.arg("-u").arg(self.path("tool.py")).args(args);
        c
    }

    fn gcb(&self, host: Host, keyed: bool, name: &str, program: &str) -> Command {
        let log = self.path(&format!("{name}.shim.log"));
        let mut c = gcb_run(
            &self.lab,
            host,
            keyed,
            &["--broker", P1],
            Some(("info", &log)),
        );
        c.arg(program);
        c
    }

    fn start(&self, cmd: &mut Command, name: &str) -> (Proc, PathBuf) {
        let out = self.path(&format!("{name}.out"));
        cmd.stdout(File::create(&out).unwrap())
            .stderr(File::create(self.path(&format!("{name}.err"))).unwrap());
        (self.lab.spawn(cmd).expect("spawn"), out)
    }

    fn output(&self, cmd: &mut Command, timeout: Duration) -> Output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.lab.spawn(cmd).expect("spawn").finish(timeout)
    }

    fn broker(&self, keyed: bool, extra: &[&str]) -> Broker {
        let mut args = vec!["--stats-interval-secs", "2"];
        args.extend_from_slice(extra);
        Broker::start(
            &self.lab,
            Host::P1,
            P1,
            keyed,
            &args,
            &self.path("broker.log"),
        )
    }

    /// python http.server on 8000 in a1 under gcb-run, serving a random file; returns
    /// (server, proxy, file sha256).
    fn http_server(&self, keyed: bool, broker: &Broker) -> (Proc, SocketAddrV4, String) {
        let data = random_bytes(1 << 20);
        fs::write(self.path("www/f.bin"), &data).unwrap();
        let mut cmd = self.gcb(Host::A1, keyed, "http", python());
        cmd.args(["-u", "-m", "http.server", "8000", "--bind", "0.0.0.0"])
            .current_dir(self.path("www"));
        let (p, _) = self.start(&mut cmd, "http");
        let proxy = broker.proxy_of("tcp listener", &format!("{A1}:8000"), UP);
        (p, proxy, sha256(&data))
    }

    /// A plain curl from `host` to the proxy; Ok(sha256 of the body) or Err(why).
    fn curl(&self, host: Host, proxy: SocketAddrV4) -> Result<String, String> {
        let mut c = self.cmd(host, true, "curl");
        c.args(["-sS", "--max-time", "15"])
            .arg(format!("http://{proxy}/f.bin"));
        let out = self.output(&mut c, RUN);
        if out.status.success() {
            Ok(sha256(&out.stdout))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `n` legitimate fetches from `host`, every body checked.
    fn legit_fetches(&self, host: Host, proxy: SocketAddrV4, sha: &str, n: usize, b: &Broker) {
        let mut bad = Vec::new();
        for i in 0..n {
            match self.curl(host, proxy) {
                Ok(s) if s == sha => {}
                Ok(s) => bad.push(format!("#{i}: wrong bytes {s}")),
                Err(e) => bad.push(format!("#{i}: {e}")),
            }
        }
        assert!(
            bad.is_empty(),
            "legitimate fetches from {host} through {proxy} failed during the flood \
             ({} of {n}): {bad:?}\nbroker log tail:\n{}",
            bad.len(),
            tail(&b.text(), 30)
        );
    }
}

/// Recipe: 1,100 idle TCP connections from p2 to a proxy (they took all 1,024 relays and
/// never timed out). Now p2 gets at most --max-relays-per-ip; b1 still fetches.
#[test]
fn idle_connections_to_a_proxy_from_one_host_leave_relays_for_others() {
    let rig = Rig::up();
    let broker = rig.broker(true, &[]);
    let (_http, proxy, sha) = rig.http_server(true, &broker);
    let port = proxy.port().to_string();
    let (_flood, out) = rig.start(
        &mut rig.tool(Host::P2, &["hold", P1, &port, "1100", ""]),
        "hold",
    );
    assert!(wait_line(&out, RUN, |l| l.starts_with("OPENED")).is_some());
    thread::sleep(Duration::from_secs(3));
    rig.legit_fetches(Host::B1, proxy, &sha, 5, &broker);
}

/// Recipe: 1,100 slow preambles (one byte, then silence) on the relay port from p2 (legit
/// 2/30 succeeded). The listener runs without standbys, so every legitimate connection
/// needs a dial-back to the relay port during the flood.
#[test]
fn slow_preambles_from_one_host_do_not_block_the_relay_port() {
    let rig = Rig::up();
    let broker = rig.broker(true, &[]);
    let data = random_bytes(1 << 20);
    fs::write(rig.path("www/f.bin"), &data).unwrap();
    let mut cmd = rig.gcb(Host::A1, true, "http", python());
    cmd.args(["-u", "-m", "http.server", "8000", "--bind", "0.0.0.0"])
        .env("GCB_STANDBY", "0")
        .current_dir(rig.path("www"));
    let _http = rig.start(&mut cmd, "http");
    let proxy = broker.proxy_of("tcp listener", &format!("{A1}:8000"), UP);
    let (_flood, out) = rig.start(
        &mut rig.tool(Host::P2, &["hold", P1, "9650", "1100", "G"]),
        "hold",
    );
    assert!(wait_line(&out, RUN, |l| l.starts_with("OPENED")).is_some());
    rig.legit_fetches(Host::B1, proxy, &sha256(&data), 10, &broker);
}

/// Recipe: 1,100 unauthenticated `connect_request`s from p2 (1,024 phantom connections
/// queued at the listener, relays refused for 20 s). Now p2's waiting pairings are capped
/// per IP, and a plain client on b1 still fetches.
#[test]
fn connect_request_flood_from_one_host_leaves_relays_for_others() {
    let rig = Rig::up();
    let broker = rig.broker(false, &[]);
    let (_http, proxy, sha) = rig.http_server(false, &broker);
    let target = format!("{P1}:9650");
    let out = rig.output(
        &mut rig.tool(
            Host::P2,
            &["connect_flood", &target, &proxy.to_string(), "1100"],
        ),
        RUN,
    );
    assert!(out.status.success(), "{out:?}");
    thread::sleep(Duration::from_secs(2));
    rig.legit_fetches(Host::B1, proxy, &sha, 5, &broker);
    let dialed = read(&rig.path("http.shim.log"))
        .lines()
        .filter(|l| l.contains("connect_back"))
        .count();
    assert!(
        dialed <= 200,
        "the flood made the listener dial back {dialed} times (phantom connections)"
    );
}

/// Recipe: `register` x 256 from each of 17 source ports of p2 (the broker-wide cap of
/// 4,096 was reached in 1.5 s). Now p2 is held to its per-IP share (and the control rate
/// limit), and a server in a1 that starts after the flood registers and serves b1.
#[test]
fn register_flood_from_many_ports_of_one_host_leaves_room_for_others() {
    let rig = Rig::up();
    let broker = rig.broker(false, &[]);
    let target = format!("{P1}:9650");
    let out = rig.output(
        &mut rig.tool(Host::P2, &["register_flood", &target, "17", "256"]),
        RUN,
    );
    assert!(out.status.success(), "{out:?}");
    thread::sleep(Duration::from_secs(3));
    let (_http, proxy, sha) = rig.http_server(false, &broker);
    rig.legit_fetches(Host::B1, proxy, &sha, 2, &broker);
}

/// Recipe: one datagram to a UDP proxy from each of 4,100 source ports of p2 (the proxy's
/// rule table was full for 60 s). Now p2 gets at most --max-udp-rules-per-sender-ip of
/// them, and a sender on p1 still gets its echo.
#[test]
fn udp_spray_from_many_ports_of_one_host_leaves_rules_for_others() {
    let rig = Rig::up();
    let broker = rig.broker(true, &[]);
    let mut cmd = rig.gcb(Host::A1, true, "echo", python());
    cmd.arg("-u")
        .arg(rig.path("tool.py"))
        .args(["udp_echo_server", "7700"]);
    let _echo = rig.start(&mut cmd, "echo");
    let proxy = broker.proxy_of("udp socket", &format!("{A1}:7700"), UP);
    // Let the listener's first Dummy reach the broker.
    thread::sleep(Duration::from_secs(2));
    let out = rig.output(
        &mut rig.tool(
            Host::P2,
            &[
                "udp_spray",
                &proxy.ip().to_string(),
                &proxy.port().to_string(),
                "4100",
            ],
        ),
        RUN,
    );
    assert!(out.status.success(), "{out:?}");
    thread::sleep(Duration::from_millis(2500));
    let stats = broker.text();
    let stats = stats
        .lines()
        .rev()
        .find(|l| l.contains(" stats "))
        .unwrap_or("");
    eprintln!("after the spray: {stats}");
    let payload = random_bytes(700);
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    for host in [Host::P1, Host::B1] {
        let out = rig.output(
            &mut rig.tool(
                host,
                &[
                    "udp_ask",
                    &proxy.ip().to_string(),
                    &proxy.port().to_string(),
                    &hex,
                ],
            ),
            RUN,
        );
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            s.trim(),
            format!("ECHO {hex}"),
            "a sender on {host} got no (or a wrong) echo after the spray; broker log tail:\n{}",
            tail(&broker.text(), 20)
        );
    }
}

/// Finding 6: the broker killed (SIGKILL) in the middle of a 20 MB relayed transfer. The
/// receiving program (in a1, behind the proxy) must see an error, not a clean end of
/// stream after a truncated transfer.
#[test]
fn broker_killed_mid_transfer_resets_the_receiver() {
    let rig = Rig::up();
    let mut broker = rig.broker(true, &[]);
    let mut cmd = rig.gcb(Host::A1, true, "sink", python());
    cmd.arg("-u")
        .arg(rig.path("tool.py"))
        .args(["sink", "7800"]);
    let (mut sink, sink_out) = rig.start(&mut cmd, "sink");
    let proxy = broker.proxy_of("tcp listener", &format!("{A1}:7800"), UP);
    let (_sender, send_out) = rig.start(
        &mut rig.tool(
            Host::P2,
            &[
                "slow_send",
                &proxy.ip().to_string(),
                &proxy.port().to_string(),
                "20",
            ],
        ),
        "send",
    );
    assert!(
        wait_line(&broker.log, UP, |l| l.contains("relay started")).is_some(),
        "no relay: {}",
        broker.text()
    );
    thread::sleep(Duration::from_millis(1200));
    broker.proc.signal_group(libc::SIGKILL);
    let _ = broker.proc.wait_timeout(UP);
    let _ = sink.wait_timeout(UP);
    let line = wait_line(&sink_out, UP, |l| {
        l.starts_with("EOF") || l.starts_with("ERR")
    })
    .unwrap_or_else(|| panic!("the receiver never finished: {}", read(&sink_out)));
    let w: Vec<&str> = line.split_whitespace().collect();
    let got: usize = w[w.len() - 1].parse().unwrap();
    assert!(
        got < 20 << 20,
        "the transfer finished before the kill: {line}"
    );
    assert_eq!(
        (w[0], w[1]),
        ("ERR", "ECONNRESET"),
        "the receiver must see a reset, not a clean end after {got} of {} bytes \
         (sender: {})",
        20 << 20,
        read(&send_out)
    );
}

/// Finding 6: one unauthenticated `heartbeat` naming an unknown proxy made the broker send
/// 8.6x its size to the (spoofable) source: heartbeat_ack plus a retransmitted
/// reregister_request. Now an unkeyed broker sends no more bytes than it received, and a
/// legitimate unkeyed GCB server and client still work (their padded requests get
/// their full replies).
#[test]
fn unauthenticated_heartbeat_is_not_amplified() {
    let rig = Rig::up();
    let broker = rig.broker(false, &[]);
    let target = format!("{P1}:9650");
    let out = rig.output(
        &mut rig.tool(Host::P2, &["heartbeat_victim", &target, "12"]),
        RUN,
    );
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let w: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"SENT"), "{s:?} {out:?}");
    let (sent, got): (usize, usize) = (w[1].parse().unwrap(), w[3].parse().unwrap());
    assert!(
        got <= sent,
        "the broker sent {got} bytes ({} datagrams) to the source of one {sent}-byte \
         unauthenticated heartbeat",
        w[5]
    );
    let (_http, proxy, sha) = rig.http_server(false, &broker);
    rig.legit_fetches(Host::B1, proxy, &sha, 2, &broker);
}
