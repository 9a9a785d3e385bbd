//! Tests of the network lab itself: `scripts/netlab selftest`, and the Rust harness
//! (`gcb_lab::Lab`) with real tools across the lab's NAT. Needs root; never skips.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gcb_lab::{namespaces_with_prefix, random_bytes, repo_root, require_root, sha256, Host, Lab};

const T: Duration = Duration::from_secs(5);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn assert_gone(name: &str) {
    let left = namespaces_with_prefix(&format!("{name}-"));
    assert!(
        left.is_empty(),
        "lab {name} left namespaces behind: {left:?}"
    );
}

/// Starts a TCP server on `host:port` that answers each connection with `SOCAT_PEERADDR`
/// followed by `tag`.
fn peer_tag_server(lab: &Lab, host: Host, port: u16, tag: &str) -> gcb_lab::Proc {
    let server = lab
        .spawn(
            lab.cmd(host, "socat")
                .arg(format!("TCP-LISTEN:{port},reuseaddr,fork"))
                .arg(format!("SYSTEM:echo $SOCAT_PEERADDR {tag}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("spawn socat");
    lab.wait_for_tcp_listen(host, port, T).unwrap();
    server
}

fn ask(lab: &Lab, from: Host, addr: impl std::fmt::Display, port: u16) -> String {
    let out = lab.run(
        from,
        "ncat",
        [
            "-w",
            "2",
            "--recv-only",
            &addr.to_string(),
            &port.to_string(),
        ],
        T,
    );
    stdout(&out)
}

#[test]
fn netlab_selftest_passes() {
    require_root();
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/netlab"))
        .arg("selftest")
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/netlab selftest");
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "netlab selftest failed:\n{text}");
    assert!(
        text.contains("all checks passed"),
        "selftest output: {text}"
    );
    assert!(!text.contains("FAIL"), "selftest output: {text}");
}

#[test]
fn one_mib_through_nat_and_no_way_back() {
    let lab = Lab::up();
    let name = lab.name().to_owned();
    assert_eq!(
        lab.existing_namespaces().len(),
        10,
        "{:?}",
        lab.existing_namespaces()
    );

    // p1 receives whatever arrives on 9000 to stdout.
    let mut receiver = lab
        .spawn(
            lab.cmd(Host::P1, "socat")
                .args(["-u", "TCP-LISTEN:9000,reuseaddr", "STDOUT"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap()
        .capture();
    lab.wait_for_tcp_listen(Host::P1, 9000, T).unwrap();

    // a1 sends 1 MiB of random bytes from its stdin, through gwa's masquerade.
    let data = random_bytes(1 << 20);
    let mut sender = lab
        .spawn(
            lab.cmd(Host::A1, "socat")
                .args(["-u", "STDIN", &format!("TCP:{}:9000", Host::P1.addr())])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap()
        .capture();
    let mut stdin = sender.child_mut().stdin.take().unwrap();
    stdin.write_all(&data).unwrap();
    drop(stdin);
    let sent = sender.finish(T);
    assert!(sent.status.success(), "sender: {sent:?}");

    let status = receiver.wait_timeout(T).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "receiver did not finish: {status:?}"
    );
    let received = receiver.finish(T);
    assert_eq!(received.stdout.len(), data.len(), "bytes received");
    assert_eq!(
        sha256(&received.stdout),
        sha256(&data),
        "sha256 at both ends"
    );

    // The same with the tools' own hashing at both ends: sha256sum in a1 and in p1.
    let sink = lab
        .spawn(
            lab.cmd(Host::P1, "sh")
                .args([
                    "-c",
                    "socat -u TCP-LISTEN:9001,reuseaddr STDOUT | sha256sum",
                ])
                .stdout(Stdio::piped()),
        )
        .unwrap();
    lab.wait_for_tcp_listen(Host::P1, 9001, T).unwrap();
    let file = std::env::temp_dir().join(format!("gcb-lab-{name}.bin"));
    let src = lab.sh(
        Host::A1,
        &format!(
            "head -c 1048576 /dev/urandom > {f} && sha256sum < {f} && socat -u FILE:{f} TCP:{p1}:9001",
            f = file.display(),
            p1 = Host::P1.addr()
        ),
        T,
    );
    let _ = std::fs::remove_file(&file);
    assert!(src.status.success(), "a1 side: {src:?}");
    let sink_out = sink.finish(T);
    assert!(sink_out.status.success(), "p1 side: {sink_out:?}");
    let (sent_hash, recv_hash) = (stdout(&src), stdout(&sink_out));
    assert_eq!(sent_hash.len(), 64 + 3, "sha256sum output: {sent_hash}");
    assert_eq!(sent_hash, recv_hash, "sha256sum in a1 vs in p1");

    // The server saw the gateway's public address (masquerade).
    let _server = peer_tag_server(&lab, Host::P1, 9002, "p1");
    assert_eq!(
        ask(&lab, Host::A1, Host::P1.addr(), 9002),
        format!("{} p1", Host::A1.public_addr())
    );

    // Inbound: a listener in a1 is reachable from a2 (same LAN) but not from p1, neither by
    // its private address nor by the gateway's public address.
    let _listener = peer_tag_server(&lab, Host::A1, 9003, "a1");
    assert!(
        lab.tcp_connects(Host::A2, Host::A1.addr(), 9003),
        "a2 -> a1 must work"
    );
    assert!(
        !lab.tcp_connects(Host::P1, Host::A1.addr(), 9003),
        "p1 -> a1 private must fail"
    );
    assert!(
        !lab.tcp_connects(Host::P1, Host::Gwa.addr(), 9003),
        "p1 -> gwa public must fail"
    );
    assert!(
        !lab.tcp_connects(Host::B1, Host::A1.addr(), 9003),
        "b1 -> a1 must fail"
    );

    drop(lab);
    assert_gone(&name);
}

#[test]
fn two_labs_at_once_do_not_interfere() {
    let one = Lab::up();
    let two = Lab::up();
    assert_ne!(one.name(), two.name());

    // The same addresses and ports in both labs, each answering with its own tag.
    let _s1 = peer_tag_server(&one, Host::P1, 7000, one.name());
    let _s2 = peer_tag_server(&two, Host::P1, 7000, two.name());
    let a1_seen = format!("{}", Host::A1.public_addr());
    assert_eq!(
        ask(&one, Host::A1, Host::P1.addr(), 7000),
        format!("{a1_seen} {}", one.name())
    );
    assert_eq!(
        ask(&two, Host::A1, Host::P1.addr(), 7000),
        format!("{a1_seen} {}", two.name())
    );

    // Total loss on lab one's gwa cuts a1 off there, and only there.
    one.loss(Host::Gwa, 100);
    assert!(
        !one.tcp_connects(Host::A1, Host::P1.addr(), 7000),
        "lab one: a1 -> p1 with 100% loss"
    );
    assert!(
        two.tcp_connects(Host::A1, Host::P1.addr(), 7000),
        "lab two: a1 -> p1 unaffected"
    );
    assert!(
        one.tcp_connects(Host::B1, Host::P1.addr(), 7000),
        "lab one: b1 behind gwb unaffected"
    );
    one.loss(Host::Gwa, 0);
    assert!(
        one.tcp_connects(Host::A1, Host::P1.addr(), 7000),
        "lab one: a1 -> p1 after loss 0"
    );

    // Tearing one down leaves the other working.
    let one_name = one.name().to_owned();
    drop(one);
    assert_gone(&one_name);
    assert_eq!(two.existing_namespaces().len(), 10);
    assert_eq!(
        ask(&two, Host::B1, Host::P1.addr(), 7000),
        format!("{} {}", Host::Gwb.addr(), two.name())
    );
    let two_name = two.name().to_owned();
    drop(two);
    assert_gone(&two_name);
}

#[test]
fn lab_is_torn_down_when_a_test_panics() {
    let mut name = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::up();
        name = lab.name().to_owned();
        // A process still running in the lab must not keep it alive.
        let _server = lab.spawn(lab.cmd(Host::P1, "sleep").arg("600")).unwrap();
        panic!("deliberate panic inside a lab test");
    }));
    assert!(result.is_err());
    assert!(!name.is_empty());
    assert_gone(&name);
}

#[test]
fn proc_guard_kills_the_whole_process_group() {
    let lab = Lab::up();
    // sh starts two background sleeps (same process group) and waits.
    let guard = lab
        .spawn(
            lab.cmd(Host::A2, "sh")
                .args(["-c", "sleep 600 & sleep 600 & wait"]),
        )
        .unwrap();
    let ns = lab.ns(Host::A2);
    let pids = || {
        let out = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .count()
    };
    let deadline = Instant::now() + T;
    while pids() < 3 {
        assert!(Instant::now() < deadline, "sh and two sleeps did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(guard);
    let deadline = Instant::now() + T;
    while pids() > 0 {
        assert!(
            Instant::now() < deadline,
            "processes survived the guard: {} left",
            pids()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // run(): output, exit status, and the timeout kill.
    let out = lab.sh(Host::A2, "echo hi; exit 3", T);
    assert_eq!(stdout(&out), "hi");
    assert_eq!(out.status.code(), Some(3));
    let started = Instant::now();
    let out = lab.run(Host::A2, "sleep", ["30"], Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status.code(), None, "a timed-out program is killed");

    // Host metadata matches the namespaces.
    for host in Host::ALL {
        let out = lab.run(host, "ip", ["-4", "-o", "addr", "show"], T);
        let text = stdout(&out);
        assert!(
            text.contains(&format!("{}/24", host.addr())),
            "{host}: {text}"
        );
        if let Some(lan) = host.lan_addr() {
            assert!(text.contains(&format!("{lan}/24")), "{host}: {text}");
        }
    }
}

#[test]
fn pure_helpers() {
    assert_eq!(
        sha256(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(gcb_lab::release_artifact("brokerd").ends_with("release/brokerd"));
    assert_eq!(Host::A1.public_addr(), Host::Gwa.addr());
    assert_eq!(Host::B1.gateway(), Some(Host::Gwb));
    assert!(Host::P2.gateway().is_none() && !Host::P2.is_private() && !Host::Gwa.is_private());
}

/// A TCP simultaneous open from `BIND_IP:BIND_PORT` to `PEER_IP:PEER_PORT` (both ends run
/// it at once): retries connect() until SECS pass; on success sends TAG, prints
/// `connected PEER_IP:PEER_PORT got PEER_TAG`, else `failed last ERRNO`.
const SIMOPEN_PY: &str = r#"
import errno, socket, sys, time
bip, bport, pip, pport, secs, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
deadline = time.time() + secs
last = "none"
while time.time() < deadline:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bip, bport))
    s.settimeout(max(0.1, deadline - time.time()))
    try:
        s.connect((pip, pport))
    except OSError as e:
        last = errno.errorcode.get(e.errno, str(e)) if e.errno else "timeout"
        s.close()
        time.sleep(0.05)
        continue
    s.settimeout(5)
    s.sendall(tag.encode() + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        d = s.recv(100)
        if not d:
            break
        got += d
    print("connected %s:%d got %s" % (s.getpeername() + (got.decode().strip(),)))
    sys.exit(0)
print("failed last %s" % last)
sys.exit(1)
"#;

/// Runs a simultaneous open between a1 (port `pa`) and b1 (port `pb`), each aiming at the
/// other's gateway address and own port (what an endpoint-independent NAT keeps), for at
/// most `secs`; returns (a1's line, b1's line).
fn simultaneous_open(lab: &Lab, pa: u16, pb: u16, secs: u32) -> (String, String) {
    let side = |host: Host, port: u16, peer: Host, peer_port: u16| {
        let mut c = lab.cmd(host, "python3");
        c.args(["-c", SIMOPEN_PY])
            .arg(host.addr().to_string())
            .arg(port.to_string())
            .arg(peer.public_addr().to_string())
            .arg(peer_port.to_string())
            .arg(secs.to_string())
            .arg(host.name())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        lab.spawn(&mut c).expect("spawn simopen")
    };
    let a = side(Host::A1, pa, Host::B1, pb);
    let b = side(Host::B1, pb, Host::A1, pa);
    let limit = Duration::from_secs(u64::from(secs) + 10);
    let (a, b) = (a.finish(limit), b.finish(limit));
    (stdout(&a), stdout(&b))
}

/// What p1 sees (`IP:PORT`) of a connection from `from`'s local port `sport` to p1:9100.
fn seen_from_port(lab: &Lab, from: Host, sport: u16) -> String {
    let out = lab.run(
        from,
        "ncat",
        [
            "-w",
            "2",
            "-p",
            &sport.to_string(),
            "--recv-only",
            &Host::P1.addr().to_string(),
            "9100",
        ],
        T,
    );
    stdout(&out).replace(' ', ":")
}

/// What happens to a TCP SYN from p1 to gwa's own address on a closed port: `refused`
/// (RST) or `timeout` (dropped).
fn syn_to_gateway(lab: &Lab) -> String {
    let script = "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    \
                  s.connect(('203.0.113.1', 9))\n    print('connected')\nexcept \
                  ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    \
                  print('timeout')\n";
    stdout(&lab.run(Host::P1, "python3", ["-c", script], T))
}

/// `netlab cpe` (TCP too), `netlab nat` and `netlab synblock` give the gateway behaviours
/// the TCP hole-punching tests rely on: a stealth gateway does not answer a SYN to itself;
/// with it, a TCP simultaneous open between a1 and b1 (different NATs) connects and each
/// end sees the other's gateway address and its own port; a hard NAT changes the port per
/// connection and the open fails; SYN-blocking gateways make it fail while outbound
/// connections still work; and every setting can be undone.
#[test]
fn gateway_modes_decide_whether_tcp_simultaneous_open_works() {
    let lab = Lab::up();
    let _p1 = lab
        .spawn(
            lab.cmd(Host::P1, "socat")
                .arg("TCP-LISTEN:9100,reuseaddr,fork")
                // (a `:` would end socat's address: a space, turned into `:` below)
                .arg("SYSTEM:echo $SOCAT_PEERADDR $SOCAT_PEERPORT")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("spawn socat");
    lab.wait_for_tcp_listen(Host::P1, 9100, T).unwrap();

    // A plain Linux gateway answers a SYN to itself with RST; a stealth one drops it.
    assert_eq!(syn_to_gateway(&lab), "refused", "cpe off: RST");
    lab.cpe(true);
    assert_eq!(syn_to_gateway(&lab), "timeout", "cpe on: dropped");

    // Easy NAT (the default) keeps the port: simultaneous open works.
    assert_eq!(seen_from_port(&lab, Host::A1, 40010), "203.0.113.1:40010");
    let (a, b) = simultaneous_open(&lab, 40001, 40002, 8);
    assert_eq!(a, "connected 203.0.113.2:40002 got b1", "a1 side (b1: {b})");
    assert_eq!(b, "connected 203.0.113.1:40001 got a1", "b1 side (a1: {a})");

    // Hard NAT on gwa: a random port per connection, the open fails.
    lab.nat(Host::Gwa, true);
    let ports: Vec<String> = [40011, 40011, 40012]
        .iter()
        .map(|p| seen_from_port(&lab, Host::A1, *p))
        .collect();
    for (seen, sport) in ports.iter().zip(["40011", "40011", "40012"]) {
        let (ip, port) = seen.split_once(':').unwrap_or_else(|| panic!("{seen:?}"));
        assert_eq!(ip, "203.0.113.1", "{ports:?}");
        assert_ne!(port, sport, "hard NAT kept the port: {ports:?}");
    }
    assert_ne!(
        ports[0], ports[1],
        "same local port, new public port: {ports:?}"
    );
    let (a, b) = simultaneous_open(&lab, 40003, 40004, 4);
    assert!(
        a.starts_with("failed") && b.starts_with("failed"),
        "hard NAT: {a} / {b}"
    );
    assert_eq!(
        seen_from_port(&lab, Host::B1, 40013),
        "203.0.113.2:40013",
        "gwb stays easy"
    );
    lab.nat(Host::Gwa, false);
    assert_eq!(seen_from_port(&lab, Host::A1, 40014), "203.0.113.1:40014");

    // SYN-blocking gateways: the open fails, outbound connections still work, and the
    // block composes with loss (its own table).
    lab.synblock(Host::Gwa, true);
    lab.synblock(Host::Gwb, true);
    lab.loss(Host::Gwa, 0);
    assert_eq!(seen_from_port(&lab, Host::A1, 40015), "203.0.113.1:40015");
    assert_eq!(seen_from_port(&lab, Host::B1, 40016), "203.0.113.2:40016");
    let (a, b) = simultaneous_open(&lab, 40005, 40006, 4);
    assert!(
        a.starts_with("failed") && b.starts_with("failed"),
        "synblock: {a} / {b}"
    );

    // All undone: it works again.
    lab.synblock(Host::Gwa, false);
    lab.synblock(Host::Gwb, false);
    let (a, b) = simultaneous_open(&lab, 40007, 40008, 8);
    assert_eq!(a, "connected 203.0.113.2:40008 got b1", "a1 side (b1: {b})");
    assert_eq!(b, "connected 203.0.113.1:40007 got a1", "b1 side (a1: {a})");
    lab.cpe(false);
    assert_eq!(syn_to_gateway(&lab), "refused", "cpe off again: RST");

    // `down` takes the extra tables with the namespaces.
    let name = lab.name().to_owned();
    drop(lab);
    assert_gone(&name);
}
