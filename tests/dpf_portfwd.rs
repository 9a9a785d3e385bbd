//! DPF in the lab: the real `gcb-portfwd` on gwa (real nftables), driven by
//! `gcb-dpf-request` from a1/a2, traffic from p1 through the forwarded
//! public port. Needs root; never skips. Build first:
//! `cargo build --release -p gcb-portfwd`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use gcb_lab::{
    portfwd_maps, random_bytes, release_artifact, sha256, wait_until, Host, Lab, Portfwd, Proc,
    Scratch,
};

const T: Duration = Duration::from_secs(10);
const PROBE_SECS: u64 = 2;
const QUOTA: usize = 4;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// portfwd on gwa (keyed) for 10.1.0.0/24, ports 20000-20099, state and log in `dir`.
fn start_portfwd(lab: &Lab, dir: &Path) -> Portfwd {
    Portfwd::start(
        lab,
        dir,
        &[
            "--private",
            "10.1.0.0/24",
            "--ports",
            "20000-20099",
            &format!("--probe-interval-secs={PROBE_SECS}"),
            &format!("--quota={QUOTA}"),
        ],
    )
}

/// Runs `gcb-dpf-request --server 10.1.0.1 ARGS` in `host`: (exit code, stdout).
fn request(lab: &Lab, host: Host, args: &[&str]) -> (i32, String) {
    let mut all = vec!["--server", "10.1.0.1"];
    all.extend_from_slice(args);
    let out = lab.run(host, release_artifact("gcb-dpf-request"), all, T);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

fn public_port(reply: &str) -> u16 {
    let tail = reply
        .split("\"public\":\"203.0.113.1:")
        .nth(1)
        .unwrap_or_else(|| panic!("no public address in {reply}"));
    tail[..tail.find('"').unwrap()].parse().unwrap()
}

/// A DPF client that keeps its mapping (and management socket) while it runs.
fn hold(lab: &Lab, private: &str, udp: bool) -> (Proc, u16) {
    let mut cmd = lab.cmd(Host::A1, release_artifact("gcb-dpf-request"));
    cmd.args(["--server", "10.1.0.1", "forward", private, "--hold"]);
    if udp {
        cmd.arg("--udp");
    }
    let mut p = lab.spawn(cmd.stdout(Stdio::piped())).unwrap();
    let mut line = String::new();
    BufReader::new(p.child_mut().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"forwarded\""), "hold {private}: {line}");
    (p, public_port(&line))
}

/// `hold` from any private host, with extra `forward` arguments.
fn hold_on(lab: &Lab, host: Host, private: &str, extra: &[&str]) -> (Proc, u16) {
    let mut cmd = lab.cmd(host, release_artifact("gcb-dpf-request"));
    cmd.args(["--server", "10.1.0.1", "forward", private, "--hold"])
        .args(extra);
    let mut p = lab.spawn(cmd.stdout(Stdio::piped())).unwrap();
    let mut line = String::new();
    BufReader::new(p.child_mut().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"forwarded\""), "hold {private}: {line}");
    (p, public_port(&line))
}

fn nft(lab: &Lab, args: &str) -> String {
    let out = lab.sh(Host::Gwa, &format!("nft {args}"), T);
    assert!(out.status.success(), "nft {args}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// p1 sends 256 KiB over TCP to 203.0.113.1:port, a1 receives on 10.1.0.11:7000.
fn tcp_through(lab: &Lab, dir: &Path, port: u16) -> bool {
    let (src, dst) = (dir.join("tcp.in"), dir.join("tcp.out"));
    let data = random_bytes(256 * 1024);
    std::fs::write(&src, &data).unwrap();
    let _ = std::fs::remove_file(&dst);
    let rx = lab
        .spawn(lab.cmd(Host::A1, "sh").arg("-c").arg(format!(
            "ncat -l --recv-only 10.1.0.11 7000 > {}",
            dst.display()
        )))
        .unwrap();
    lab.wait_for_tcp_listen(Host::A1, 7000, T).unwrap();
    let tx = lab.sh(
        Host::P1,
        &format!(
            "ncat -w 2 --send-only 203.0.113.1 {port} < {}",
            src.display()
        ),
        T,
    );
    let out = rx.finish(Duration::from_secs(if tx.status.success() { 5 } else { 0 }));
    let _ = out;
    tx.status.success()
        && std::fs::read(&dst)
            .map(|got| sha256(&got) == sha256(&data))
            .unwrap_or(false)
}

/// p1 sends one 4 KiB UDP datagram to 203.0.113.1:port, a1 receives on 10.1.0.11:7001.
fn udp_through(lab: &Lab, dir: &Path, port: u16) -> bool {
    let (src, dst) = (dir.join("udp.in"), dir.join("udp.out"));
    let data = random_bytes(4096);
    std::fs::write(&src, &data).unwrap();
    let _ = std::fs::remove_file(&dst);
    let rx = lab
        .spawn(
            lab.cmd(Host::A1, "socat")
                .arg("-u")
                .arg("UDP-RECV:7001,bind=10.1.0.11")
                .arg(format!("CREATE:{}", dst.display())),
        )
        .unwrap();
    lab.wait_for_udp_bind(Host::A1, 7001, T).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut ok = false;
    while Instant::now() < deadline && !ok {
        lab.sh(
            Host::P1,
            &format!("socat -u OPEN:{} UDP:203.0.113.1:{port}", src.display()),
            T,
        );
        std::thread::sleep(Duration::from_millis(200));
        ok = std::fs::read(&dst)
            .map(|got| got.len() >= data.len() && sha256(&got[..data.len()]) == sha256(&data))
            .unwrap_or(false);
    }
    drop(rx);
    ok
}

#[test]
fn dpf_forward_restart_flush_probe_refusals() {
    let lab = Lab::up();
    let dir = Scratch::new("portfwd", &lab);

    // An administrator's own rules, one before and one after portfwd starts.
    nft(
        &lab,
        "-f - <<'EOF'\ntable inet admin {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 2222 counter accept comment \"admin-before\"\n }\n}\nEOF",
    );
    let mut daemon = start_portfwd(&lab, &dir);
    nft(
        &lab,
        "-f - <<'EOF'\ntable ip adminnat {\n chain pre {\n  type nat hook prerouting priority dstnat - 5; policy accept;\n  iifname \"wan0\" tcp dport 2223 dnat to 10.1.0.12:2223 comment \"admin-after\"\n }\n}\nEOF",
    );
    let admin = || nft(&lab, "list table inet admin") + &nft(&lab, "list table ip adminnat");
    let admin_before = admin();

    // Unsolicited inbound fails before forwarding.
    assert!(!lab.tcp_connects(Host::P1, "203.0.113.1", 20000));

    // 1. forward TCP and UDP; data from p1 arrives intact.
    let (tcp_client, tport) = hold(&lab, "10.1.0.11:7000", false);
    let (_udp_client, uport) = hold(&lab, "10.1.0.11:7001", true);
    assert!((20000..20100).contains(&tport) && (20000..20100).contains(&uport));
    assert!(
        tcp_through(&lab, &dir, tport),
        "TCP p1 -> 203.0.113.1:{tport} -> a1:7000"
    );
    assert!(
        udp_through(&lab, &dir, uport),
        "UDP p1 -> 203.0.113.1:{uport} -> a1:7001"
    );
    // Same-network query (from a2) is answered from the mapping table.
    let (rc, q) = request(&lab, Host::A2, &["query", &format!("203.0.113.1:{tport}")]);
    assert_eq!(rc, 0);
    assert!(
        q.contains("\"private\":\"10.1.0.11:7000\"") && q.contains("\"epoch\":1"),
        "{q}"
    );
    let table_before = portfwd_maps(&lab);
    assert!(
        table_before.contains(&format!("{tport} : 10.1.0.11 . 7000")),
        "{table_before}"
    );

    // 5. refusals: clear errors, nothing installed.
    let cases: [(&[&str], &str); 3] = [
        (
            &["forward", "10.1.0.12:7000", "--probe-port", "1"],
            "not_owner",
        ),
        (
            &[
                "forward",
                "10.1.0.11:7005",
                "--probe-port",
                "1",
                "--desired-port",
                "30000",
            ],
            "port_range",
        ),
        (
            &[
                "forward",
                "10.1.0.11:7006",
                "--probe-port",
                "1",
                "--desired-port",
                &tport.to_string(),
            ],
            "port_range",
        ),
    ];
    for (args, code) in cases {
        let (rc, out) = request(&lab, Host::A1, args);
        assert_eq!(rc, 2, "{args:?}: {out}");
        assert!(
            out.contains(&format!("\"code\":\"{code}\"")) && out.contains("\"reason\":\""),
            "{args:?}: {out}"
        );
    }
    assert_eq!(
        portfwd_maps(&lab),
        table_before,
        "refusals installed nothing"
    );
    // quota: a1 has 2 mappings; 2 more fit, the next is refused.
    let mgmt = lab
        .spawn(lab.cmd(Host::A1, "ncat").args(["-lk", "10.1.0.11", "7999"]))
        .unwrap();
    lab.wait_for_tcp_listen(Host::A1, 7999, T).unwrap();
    for p in ["7010", "7011"] {
        let (rc, out) = request(
            &lab,
            Host::A1,
            &["forward", &format!("10.1.0.11:{p}"), "--probe-port", "7999"],
        );
        assert_eq!(rc, 0, "{out}");
    }
    let full = portfwd_maps(&lab);
    let (rc, out) = request(
        &lab,
        Host::A1,
        &["forward", "10.1.0.11:7012", "--probe-port", "7999"],
    );
    assert_eq!(rc, 2, "{out}");
    assert!(out.contains("\"code\":\"quota\""), "{out}");
    assert_eq!(portfwd_maps(&lab), full, "quota refusal installed nothing");
    for p in ["7010", "7011"] {
        let (rc, out) = request(&lab, Host::A1, &["delete", &format!("10.1.0.11:{p}")]);
        assert_eq!(rc, 0, "{out}");
        assert!(out.contains("\"deleted\""), "{out}");
    }
    drop(mgmt);
    assert_eq!(portfwd_maps(&lab), table_before);

    // 3. kill -9 and restart: same table, traffic still flows, epoch 2.
    daemon.crash();
    daemon.restart(&lab);
    assert_eq!(portfwd_maps(&lab), table_before, "table after restart");
    assert!(tcp_through(&lab, &dir, tport), "TCP after restart");
    assert!(udp_through(&lab, &dir, uport), "UDP after restart");
    let (_, q) = request(&lab, Host::A2, &["query", &format!("203.0.113.1:{tport}")]);
    assert!(
        q.contains("\"private\":\"10.1.0.11:7000\"") && q.contains("\"epoch\":2"),
        "{q}"
    );
    // Junk datagrams are dropped (and counted in the stats line); the daemon lives on.
    lab.sh(
        Host::A1,
        "head -c 700 /dev/urandom | ncat -u -w 1 10.1.0.1 9651; echo GCB1junk | ncat -u -w 1 10.1.0.1 9651",
        T,
    );
    let (rc, q) = request(&lab, Host::A2, &["query", &format!("203.0.113.1:{tport}")]);
    assert_eq!(rc, 0, "daemon alive after junk: {q}");

    // Flush portfwd's table by hand, then delete it: the next sync restores it.
    nft(&lab, "flush table ip gcb_portfwd");
    assert!(
        !lab.tcp_connects(Host::P1, "203.0.113.1", tport),
        "flushed rules still forward"
    );
    wait_until(
        "sync restores the flushed table",
        Duration::from_secs(3 * PROBE_SECS + 3),
        || tcp_through(&lab, &dir, tport),
    );
    assert_eq!(portfwd_maps(&lab), table_before);
    nft(&lab, "delete table ip gcb_portfwd");
    wait_until(
        "sync restores the deleted table",
        Duration::from_secs(3 * PROBE_SECS + 3),
        || {
            lab.sh(Host::Gwa, "nft list table ip gcb_portfwd", T)
                .status
                .success()
                && portfwd_maps(&lab) == table_before
        },
    );
    assert!(tcp_through(&lab, &dir, tport), "TCP after re-creation");

    // 4. the client dies: its mapping is gone within one probe interval (+ a round).
    drop(tcp_client);
    let t0 = Instant::now();
    wait_until(
        "dead client's mapping removed",
        Duration::from_secs(PROBE_SECS + 2),
        || !portfwd_maps(&lab).contains(&format!("{tport} : 10.1.0.11 . 7000")),
    );
    eprintln!("mapping removed {:?} after the client died", t0.elapsed());
    let (_, q) = request(&lab, Host::A2, &["query", &format!("203.0.113.1:{tport}")]);
    assert!(!q.contains("\"private\""), "{q}");
    assert!(
        portfwd_maps(&lab).contains(&format!("{uport} : 10.1.0.11 . 7001")),
        "live UDP client kept"
    );

    // 6. the administrator's rules were never touched.
    assert_eq!(admin(), admin_before);
    assert!(admin().contains("admin-before") && admin().contains("admin-after"));

    // Clean stop: the daemon prints its stats line, with the junk datagrams counted.
    let stats = daemon.stop_and_stats();
    assert!(
        stats.get("junk_datagrams").is_some_and(|&n| n >= 2),
        "junk counted: {stats:?}\n{}",
        daemon.text()
    );
}

/// A public port handed to another holder loses the old holder's flows before
/// the new holder hears (the conntrack flush of a dirty port): a UDP flow from
/// p1 that never pauses kept its dnat to a1 forever without it.
#[test]
fn dpf_port_handed_to_another_holder_drops_old_flows() {
    let lab = Lab::up();
    let dir = Scratch::new("portfwd", &lab);
    let daemon = start_portfwd(&lab, &dir);
    let recv = |host: Host, ip: &str, name: &str| {
        let out = dir.join(name);
        let p = lab
            .spawn(
                lab.cmd(host, "socat")
                    .arg("-u")
                    .arg(format!("UDP-RECV:7001,bind={ip}"))
                    .arg(format!("CREATE:{}", out.display())),
            )
            .unwrap();
        lab.wait_for_udp_bind(host, 7001, T).unwrap();
        (p, out)
    };
    let got = |f: &PathBuf| std::fs::read(f).map(|b| b.len()).unwrap_or(0);

    let (a1_rx, a1_out) = recv(Host::A1, "10.1.0.11", "a1.out");
    let (a1_hold, port) = hold_on(
        &lab,
        Host::A1,
        "10.1.0.11:7001",
        &["--udp", "--desired-port", "20050"],
    );
    assert_eq!(port, 20050);
    // p1: one datagram every 50 ms from one source port, until the test ends.
    let _flow = lab
        .spawn(
            lab.cmd(Host::P1, "python3")
                .arg("-c")
                .arg(include_str!("programs/dpf_udp_flow.py")),
        )
        .unwrap();
    wait_until("p1's flow reaches a1", T, || got(&a1_out) > 0);

    let (rc, out) = request(&lab, Host::A1, &["delete", "10.1.0.11:7001", "--udp"]);
    assert_eq!(rc, 0, "{out}");
    drop(a1_hold);
    let (a2_rx, a2_out) = recv(Host::A2, "10.1.0.12", "a2.out");
    let (_a2_hold, port) = hold_on(
        &lab,
        Host::A2,
        "10.1.0.12:7001",
        &["--udp", "--desired-port", "20050"],
    );
    assert_eq!(port, 20050);
    let at_handout = got(&a1_out);
    wait_until("p1's flow reaches a2", T, || got(&a2_out) > 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        got(&a1_out),
        at_handout,
        "a1 got nothing after the hand-out"
    );
    drop((a1_rx, a2_rx));
    drop(daemon);
}
