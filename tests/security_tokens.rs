//! Issue #10, findings 2, 3 and part of 6, in the lab: what proves a registration's
//! ownership and what binds its tokens, seen from an attacker on p2.
//!
//! * Finding 2 (no key, broker open to all): `spoofed_unregister_does_not_hand_the_proxy_to_an_attacker`
//!   (a blind unregister forged from the listener's control address, then
//!   `register{previous_proxy: P}`), `udp_twin_of_a_tcp_proxy_cannot_be_squatted`.
//! * Finding 3 (a key on both sides, an on-path observer sniffing p1 with an `AF_PACKET`
//!   socket): `sniffed_registration_token_parks_no_standby`,
//!   `replayed_standby_preamble_parks_no_standby`,
//!   `sniffed_connect_id_is_not_spliced_into_the_connection`.
//! * Finding 6 (replay across a restart): `keyed_register_captured_before_a_broker_restart_is_refused`.
//!
//! Each test asserts what a user needs: the legitimate client gets the REAL server's bytes
//! (sha256), and the attacker gets nothing (no proxy of the listener, no `GCB-GO` claim, no
//! spliced bytes, no registration).
//!
//! The brokers run at `--log debug`; the GCB server in a1 (under `scripts/gcb-run`) sends
//! a random file to every connection. Nothing is built here (`scripts/test-all` builds the
//! workspace first); a missing artifact is a failure. The tests run against the code
//! before the fix by running the compiled test binary with `CARGO_TARGET_DIR` pointing at
//! that tree's target directory (see [`gcb_lab::target_dir`]); an older broker without
//! `--insecure` is started unkeyed without it. Needs root.

use std::fs;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use gcb_lab::{
    brokerd, gcb_run, libgcb, parse_after, python, random_bytes, read_text as read, sha256, tail,
    wait_line, Broker, Host, Lab, Logged as Started, Scratch,
};

const P1: &str = "203.0.113.10";
const GWA: &str = "203.0.113.1";
const GWB: &str = "203.0.113.2";
const A1: &str = "10.1.0.11";
const UP: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(20);

/// The GCB server: sends the file argv[2] to every connection on port argv[1].
const SERVER: &str = include_str!("programs/sectok_server.py");

/// Everything else: the observer (sniffer on p1), the attacker's moves (on p2) and the
/// legitimate client. Every mode prints summary lines a test reads.
const TOOL: &str = include_str!("programs/sectok_tool.py");

struct Rig {
    dir: Scratch,
    lab: Lab,
}

impl Rig {
    fn up() -> Rig {
        brokerd();
        libgcb();
        let lab = Lab::up();
        let dir = Scratch::new("sectok", &lab);
        fs::write(dir.join("tool.py"), TOOL).unwrap();
        fs::write(dir.join("server.py"), SERVER).unwrap();
        Rig { dir, lab }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn cmd(&self, host: Host, keyed: bool, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.lab.cmd_keyed(host, keyed, program)
    }

    /// A TOOL mode in `host`, never keyed (the attacker has no key; the observer needs none).
    fn tool(&self, host: Host, args: &[&str]) -> Command {
        let mut c = self.cmd(host, false, python());
        c.arg("-u").arg(self.path("tool.py")).args(args);
        c
    }

    fn start(&self, cmd: &mut Command, name: &str) -> Started {
        self.lab.spawn_logged(cmd, &self.dir, name)
    }

    fn output(&self, cmd: &mut Command, timeout: Duration) -> Output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.lab.spawn(cmd).expect("spawn").finish(timeout)
    }

    /// `gcb-brokerd --listen P1 --log debug` on p1, logging to `NAME.err`; `keyed` false:
    /// without the pool key, open to every source.
    fn broker(&self, keyed: bool, name: &str) -> Broker {
        let log = self.path(&format!("{name}.err"));
        let args = ["--log", "debug", "--stats-interval-secs", "1"];
        Broker::start(&self.lab, Host::P1, P1, keyed, &args, &log)
    }

    /// The observer: the sniffer on p1, writing to `sniff.txt`.
    fn sniffer(&self) -> (Started, PathBuf) {
        let file = self.path("sniff.txt");
        let s = self.start(
            &mut self.tool(Host::P1, &["sniff", file.to_str().unwrap()]),
            "sniffer",
        );
        if wait_line(&s.out, UP, |l| l == "SNIFFING").is_none() {
            panic!("the sniffer did not start: {}", read(&s.err));
        }
        (s, file)
    }

    /// The SERVER in a1 under gcb-run on `port` with a fresh random 256 KiB file; returns
    /// it, its registration line in the broker log and the file's sha256.
    fn server(&self, keyed: bool, port: u16, broker: &Broker) -> (Started, String, String) {
        let data = random_bytes(256 << 10);
        let file = self.path(&format!("payload{port}.bin"));
        fs::write(&file, &data).unwrap();
        let log = self.path(&format!("server{port}.shim.log"));
        let mut cmd = gcb_run(
            &self.lab,
            Host::A1,
            keyed,
            &["--broker", P1],
            Some(("debug", &log)),
        );
        cmd.env("GCB_HEARTBEAT_MS", "2000")
            .args([python(), "-u"])
            .arg(self.path("server.py"))
            .arg(port.to_string())
            .arg(&file);
        let s = self.start(&mut cmd, &format!("server{port}"));
        let needle = format!("registered tcp listener local {A1}:{port} ");
        let line = wait_line(&broker.log, UP, |l| l.contains(&needle)).unwrap_or_else(|| {
            panic!(
                "the server on {port} did not register:\nbroker:\n{}\nserver: {}\nshim log:\n{}",
                read(&broker.log),
                read(&s.err),
                read(&self.path(&format!("server{port}.shim.log")))
            )
        });
        (s, line, sha256(&data))
    }

    /// A client in `host` (under gcb-run, keyed, when `gcb`) fetching from `proxy`:
    /// (bytes received, sha256 of them) or the client's failure.
    fn fetch(&self, host: Host, gcb: bool, proxy: SocketAddrV4, name: &str) -> String {
        let ip = proxy.ip().to_string();
        let port = proxy.port().to_string();
        let mut cmd = if gcb {
            let log = self.path(&format!("{name}.shim.log"));
            let mut c = gcb_run(
                &self.lab,
                host,
                true,
                &["--broker", P1],
                Some(("debug", &log)),
            );
            c.args([python(), "-u"])
                .arg(self.path("tool.py"))
                .args(["fetch", &ip, &port]);
            c
        } else {
            self.tool(host, &["fetch", &ip, &port])
        };
        let out = self.output(&mut cmd, RUN);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        match s.lines().find(|l| l.starts_with("GOT ")) {
            Some(l) => l.to_owned(),
            None => format!(
                "client failed: {s} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Asserts that a client in `host` gets the real server's bytes through `proxy`.
    fn assert_real_bytes(
        &self,
        host: Host,
        gcb: bool,
        proxy: SocketAddrV4,
        sha: &str,
        what: &str,
        broker: &Broker,
    ) {
        let got = self.fetch(host, gcb, proxy, what);
        // The attackers here serve `ATTACKER-BYTES ` x 100.
        let attackers = sha256(&b"ATTACKER-BYTES ".repeat(100));
        let whose = if got.ends_with(&attackers) {
            " (the ATTACKER's bytes)"
        } else {
            ""
        };
        assert!(
            got.ends_with(&format!(" {} {sha}", 256 << 10)),
            "{what}: a client in {host} must get the real server's {} bytes (sha256 {sha}) \
             through {proxy}, got: {got}{whose}\nbroker log tail:\n{}",
            256 << 10,
            tail(&read(&broker.log), 25)
        );
    }
}

/// Finding 2 (no key): a blind `unregister` of P forged from the listener's observed
/// control address (the issue sprayed it over the NAT's source ports; here the test reads
/// the port from the broker log), then `register{previous_proxy: P}` from p2. The attacker
/// must not get P (no ownership proof), and a client of P must get the real server's bytes.
#[test]
fn spoofed_unregister_does_not_hand_the_proxy_to_an_attacker() {
    let rig = Rig::up();
    let broker = rig.broker(false, "broker");
    let (_server, line, sha) = rig.server(false, 8110, &broker);
    let control = parse_after(&line, " client ");
    let proxy = parse_after(&line, "-> proxy ");
    assert_eq!(control.ip().to_string(), GWA, "{line}");

    let attacker = rig.start(
        &mut rig.tool(
            Host::P2,
            &[
                "takeover",
                GWA,
                &control.port().to_string(),
                &proxy.to_string(),
                "12",
            ],
        ),
        "attacker",
    );
    let reply = wait_line(&attacker.out, UP, |l| l.starts_with("ATTACKER_PROXY "))
        .unwrap_or_else(|| panic!("attacker: {} {}", read(&attacker.out), read(&attacker.err)));
    // Control: the forged datagram did reach the broker, as coming from the listener.
    let blog = read(&broker.log);
    assert!(
        blog.lines()
            .any(|l| l.contains(&format!("{control} -> unregister"))),
        "the spoofed unregister never reached the broker (a test that cannot fail):\n{blog}"
    );
    rig.assert_real_bytes(Host::B1, false, proxy, &sha, "b1 -> P", &broker);
    rig.assert_real_bytes(Host::P2, false, proxy, &sha, "p2 -> P", &broker);
    let got = reply.split_whitespace().nth(1).unwrap_or("none");
    assert_ne!(
        got,
        proxy.to_string(),
        "the attacker on p2 took over the listener's proxy {proxy}: {reply}\nbroker:\n{}",
        tail(&blog, 20)
    );
    assert!(
        !blog.contains(&format!("unregistered proxy {proxy} ")),
        "a forged unregister removed {proxy}:\n{}",
        tail(&blog, 20)
    );
    let served = read(&attacker.out);
    assert!(
        !served.contains("SERVED"),
        "the attacker was handed connections of {proxy}: {served}"
    );
}

/// Finding 2, the UDP twin (no key): `register{udp, previous_proxy: P}` from p2, P being
/// a1's TCP proxy, without proof of P. The attacker must not get P's port number (the
/// listener's program would lose its UDP twin to a stranger), and P keeps serving.
#[test]
fn udp_twin_of_a_tcp_proxy_cannot_be_squatted() {
    let rig = Rig::up();
    let broker = rig.broker(false, "broker");
    let (_server, line, sha) = rig.server(false, 8120, &broker);
    let proxy = parse_after(&line, "-> proxy ");
    let out = rig.output(
        &mut rig.tool(
            Host::P2,
            &["register", "udp", "192.168.77.7:8120", &proxy.to_string()],
        ),
        RUN,
    );
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(reply.starts_with("REPLY "), "{reply} {out:?}");
    let got = reply.split_whitespace().nth(1).unwrap_or("none");
    assert_ne!(
        got,
        proxy.to_string(),
        "the attacker got the UDP twin of the listener's proxy {proxy} without proof: {reply}"
    );
    // Nothing of the attacker's listens on P's port number.
    let ss = rig.lab.run(
        Host::P1,
        "ss",
        ["-Hlun", &format!("sport = :{}", proxy.port())],
        Duration::from_secs(3),
    );
    assert!(
        String::from_utf8_lossy(&ss.stdout).trim().is_empty(),
        "a UDP socket is bound on {proxy}'s port: {}",
        String::from_utf8_lossy(&ss.stdout)
    );
    rig.assert_real_bytes(Host::B1, false, proxy, &sha, "b1 -> P", &broker);
}

/// Finding 3, standby part: keyed broker and shim; an observer on p1's segment and an
/// attacker on p2 parking a standby for P with `line` ("token": `GCB-STANDBY
/// <registered.token>` from the broker's reply; "preamble": the shim's own standby
/// preamble, replayed). Then clients of P must get the real server's bytes, and the
/// attacker's connection must receive no `GCB-GO` claim.
fn standby_case(what: &str, port: u16) {
    let rig = Rig::up();
    let (_sniffer, sniff) = rig.sniffer();
    let broker = rig.broker(true, "broker");
    let (_server, line, sha) = rig.server(true, port, &broker);
    let proxy = parse_after(&line, "-> proxy ");
    // The shim's own standby is parked first (the broker claims the newest first).
    let shim_log = rig.path(&format!("server{port}.shim.log"));
    wait_line(&broker.log, UP, |l| {
        l.contains("standby from 203.0.113.1:") && l.contains(&format!("parked for proxy {proxy}"))
    })
    .unwrap_or_else(|| {
        panic!(
            "a1's shim parked no standby:\n{}\n{}",
            read(&broker.log),
            read(&shim_log)
        )
    });
    let attacker = rig.start(
        &mut rig.tool(Host::P2, &["standby", sniff.to_str().unwrap(), what, "8"]),
        "attacker",
    );
    wait_line(&attacker.out, UP, |l| l.starts_with("PARKING "))
        .unwrap_or_else(|| panic!("attacker: {} {}", read(&attacker.out), read(&attacker.err)));
    thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        rig.assert_real_bytes(
            Host::B1,
            false,
            proxy,
            &sha,
            &format!("b1 -> P #{i}"),
            &broker,
        );
    }
    let verdict = wait_line(&attacker.out, RUN, |l| {
        l.starts_with("CLAIMED") || l.starts_with("NOT_CLAIMED")
    })
    .unwrap_or_else(|| panic!("attacker: {} {}", read(&attacker.out), read(&attacker.err)));
    assert!(
        verdict.starts_with("NOT_CLAIMED"),
        "the broker handed a client of {proxy} to the attacker's standby ({what}): \
         {verdict}\n{}",
        read(&attacker.out)
    );
}

/// Finding 3 (a): `registered.token`, read off the broker's keyed reply, as a standby key.
#[test]
fn sniffed_registration_token_parks_no_standby() {
    standby_case("token", 8130);
}

/// Finding 3 (b): a1's own standby preamble, replayed from p2.
#[test]
fn replayed_standby_preamble_parks_no_standby() {
    standby_case("preamble", 8140);
}

/// Finding 3 (c): the connect id of the relay (or punch) decision a GCB client in b1 gets, read off
/// the broker's keyed reply and presented on the relay port from p2 before b1's own
/// connection arrives (an on-path attacker can also delay packets: gwb holds b1's
/// connections to the relay port until the attacker has presented). b1 must get the real
/// server's bytes, the attacker none of them.
#[test]
fn sniffed_connect_id_is_not_spliced_into_the_connection() {
    let rig = Rig::up();
    let (_sniffer, sniff) = rig.sniffer();
    let broker = rig.broker(true, "broker");
    let (_server, line, sha) = rig.server(true, 8150, &broker);
    let proxy = parse_after(&line, "-> proxy ");
    let watcher = rig.start(
        &mut rig.tool(
            Host::P2,
            &["connect_watch", sniff.to_str().unwrap(), GWB, "6"],
        ),
        "attacker",
    );
    wait_line(&watcher.out, UP, |l| l == "WATCHING").expect("the attacker starts");
    let nft = rig.lab.sh(
        Host::Gwb,
        "nft add table inet sectok && \
         nft add chain inet sectok hold '{ type filter hook forward priority -10; policy accept; }' && \
         nft add rule inet sectok hold ip saddr 10.2.0.11 ip daddr 203.0.113.10 tcp dport 9650 drop",
        Duration::from_secs(5),
    );
    assert!(nft.status.success(), "nft on gwb: {nft:?}");
    let client = thread::scope(|s| {
        let c = s.spawn(|| rig.fetch(Host::B1, true, proxy, "client"));
        let presented = wait_line(&watcher.out, Duration::from_secs(15), |l| {
            l.starts_with("PRESENTED") || l.starts_with("NOT_SNIFFED")
        });
        let del = rig.lab.sh(
            Host::Gwb,
            "nft delete table inet sectok",
            Duration::from_secs(5),
        );
        assert!(del.status.success(), "nft on gwb: {del:?}");
        assert!(
            presented
                .as_deref()
                .is_some_and(|l| l.starts_with("PRESENTED")),
            "the observer saw no relay decision for b1: {presented:?}\nsniffed:\n{}",
            read(&sniff)
        );
        c.join().expect("client thread")
    });
    let spliced = wait_line(&watcher.out, RUN, |l| l.starts_with("SPLICED_BYTES"))
        .unwrap_or_else(|| panic!("attacker: {} {}", read(&watcher.out), read(&watcher.err)));
    assert!(
        client.ends_with(&format!(" {} {sha}", 256 << 10)),
        "b1's GCB client must get the real server's bytes through {proxy}: {client}\n\
         attacker: {spliced}\nbroker log tail:\n{}\nclient shim log:\n{}",
        tail(&read(&broker.log), 25),
        read(&rig.path("client.shim.log"))
    );
    let n: usize = spliced.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(
        n, 0,
        "the attacker presenting a sniffed connect id was spliced to the listener: {spliced}"
    );
}

/// Finding 6: a keyed `register` datagram a1's shim sent, captured on p1's segment, the
/// broker killed and restarted on the same address, the datagram replayed byte for byte
/// from p2 (inside the 30 s clock window). The restarted broker must refuse it (a frame
/// stamped before its start) and create no registration from it; the real server
/// re-registers and serves.
#[test]
fn keyed_register_captured_before_a_broker_restart_is_refused() {
    let rig = Rig::up();
    let (_sniffer, sniff) = rig.sniffer();
    let mut broker = rig.broker(true, "broker");
    let (_server, _, sha) = rig.server(true, 8160, &broker);
    let captured = |t: &str| {
        t.lines()
            .any(|l| l.starts_with(&format!("UDP {GWA}:")) && l.contains(" 203.0.113.10:9650 "))
    };
    let deadline = Instant::now() + UP;
    while !captured(&read(&sniff)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    broker.proc.kill().expect("kill the broker");
    let broker = rig.broker(true, "broker2");
    let out = rig.output(
        &mut rig.tool(Host::P2, &["replay", sniff.to_str().unwrap()]),
        RUN,
    );
    let replay = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        replay.contains("REPLAYED"),
        "nothing to replay: {replay} {}\nsniffed:\n{}",
        String::from_utf8_lossy(&out.stderr),
        read(&sniff)
    );
    // Let a stats line (every second) count it.
    thread::sleep(Duration::from_millis(2500));
    let blog = read(&broker.log);
    let replayed_registration = blog
        .lines()
        .find(|l| l.contains("registered tcp listener") && l.contains(" client 203.0.113.11:"));
    assert!(
        replayed_registration.is_none() && replay.contains("NO_ANSWER"),
        "the restarted broker accepted a frame captured before its start: {replay}\n\
         {replayed_registration:?}"
    );
    let junk = blog
        .lines()
        .rev()
        .find(|l| l.contains(" stats "))
        .map(|l| parse_counter(l, "junk_datagrams="))
        .unwrap_or(0);
    assert!(
        junk >= 1,
        "the replayed frame is not counted as rejected:\n{}",
        tail(&blog, 10)
    );
    // The real server registers again (heartbeat every 2 s, then register) and serves.
    let needle = format!("registered tcp listener local {A1}:8160 client {GWA}:");
    let line = wait_line(&broker.log, UP, |l| l.contains(&needle))
        .unwrap_or_else(|| panic!("a1 never re-registered:\n{}", read(&broker.log)));
    let proxy = parse_after(&line, "-> proxy ");
    rig.assert_real_bytes(
        Host::B1,
        false,
        proxy,
        &sha,
        "b1 -> P after restart",
        &broker,
    );
}

fn parse_counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
