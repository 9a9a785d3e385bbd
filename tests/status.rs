//! Issue #13, status and metrics: `gcb-brokerd status` / `gcb-portfwd status` against real
//! traffic in the lab, and the Prometheus endpoints scraped with curl.
//!
//! Broker on p1 (`--metrics 127.0.0.1:9660` in p1's namespace), python http.server under
//! gcb-run in a1; clients under gcb-run from p1 (a reverse connection) and from b1 (a
//! relayed one, rate-limited so the relay stays open while the test looks at it). Portfwd
//! on gwa, a server under `gcb-run --dpf` in a1.

use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gcb_lab::{
    brokerd, gcb_run, libgcb, portfwd_bin, random_bytes, read_text as read, sha256, wait_line,
    Broker, Host, Lab, Portfwd, Scratch,
};
use serde_json::Value;

const UP: Duration = Duration::from_secs(30);
const RUN: Duration = Duration::from_secs(90);

fn status_json(bin: PathBuf, sock: &Path) -> Value {
    let out = Command::new(bin)
        .args(["status", "--json", "--admin-socket"])
        .arg(sock)
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is one JSON document")
}

fn counter(doc: &Value, name: &str) -> u64 {
    doc["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {doc}"))
}

/// `curl -s http://127.0.0.1:PORT/metrics` in `host`.
fn scrape(lab: &Lab, host: Host, port: u16) -> String {
    let out = lab
        .cmd(host, "curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 metrics")
}

/// The value of the series `series` (name with labels, as printed) in a scrape.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn finish(lab: &Lab, cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    lab.spawn(cmd).expect("spawn").finish(timeout)
}

fn assert_no_daemon(bin: PathBuf, sock: &Path, name: &str) {
    let out = Command::new(bin)
        .args(["status", "--admin-socket"])
        .arg(sock)
        .output()
        .expect("run status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&sock.display().to_string()) && err.contains(&format!("no {name} answers")),
        "{err}"
    );
}

#[test]
#[ignore = "needs root and the network lab"]
fn broker_status_and_metrics_follow_real_traffic() {
    brokerd();
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("status", &lab);
    let sock = dir.join("brokerd.sock");
    assert_no_daemon(brokerd(), &sock, "gcb-brokerd");
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    let small = random_bytes(200_000);
    fs::write(www.join("small"), &small).unwrap();
    let big = random_bytes(3_000_000);
    fs::write(www.join("big"), &big).unwrap();

    let sock_s = sock.to_str().unwrap();
    let broker = Broker::start(
        &lab,
        Host::P1,
        "203.0.113.10",
        true,
        &["--admin-socket", sock_s, "--metrics", "127.0.0.1:9660"],
        &dir.join("broker.log"),
    );
    let mode = fs::metadata(&sock)
        .expect("admin socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");
    let before = scrape(&lab, Host::P1, 9660);

    // The server behind NAT A.
    let out = dir.join("server.out");
    let mut cmd = gcb_run(&lab, Host::A1, true, &["--broker", "203.0.113.10"], None);
    cmd.args([
        "python3",
        "-u",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "0.0.0.0",
    ])
    .current_dir(&www)
    .stdout(File::create(&out).unwrap())
    .stderr(File::create(dir.join("server.err")).unwrap());
    let _server = lab.spawn(&mut cmd).expect("spawn server");
    let line = wait_line(&out, UP, |l| l.starts_with("Serving HTTP on "))
        .unwrap_or_else(|| panic!("server: {}", read(&dir.join("server.err"))));
    let w: Vec<&str> = line.split_whitespace().collect();
    let proxy: SocketAddrV4 = format!("{}:{}", w[3], w[5]).parse().unwrap();
    assert_eq!(proxy.ip().to_string(), "203.0.113.10", "{line}");

    let doc = status_json(brokerd(), &sock);
    let regs = doc["registrations"].as_array().unwrap();
    let reg = regs
        .iter()
        .find(|r| r["proxy"] == proxy.to_string())
        .unwrap_or_else(|| panic!("registration of {proxy} not listed: {doc}"));
    assert_eq!(reg["proto"], "tcp");
    assert!(
        reg["observed"]
            .as_str()
            .unwrap()
            .starts_with("203.0.113.1:"),
        "{reg}"
    );
    assert!(reg["local"].as_str().unwrap().ends_with(":8000"), "{reg}");

    // A reverse connection from p1 (public, under the shim), bytes intact.
    let url = |f: &str| format!("http://{proxy}/{f}");
    let mut c = gcb_run(&lab, Host::P1, true, &["--broker", "203.0.113.10"], None);
    c.args(["curl", "-sS", "--max-time", "60", &url("small")]);
    let o = finish(&lab, &mut c, RUN);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256(&o.stdout), sha256(&small));

    // A relayed one from b1 (behind NAT B), slow enough to be seen open.
    let mut c = gcb_run(&lab, Host::B1, true, &["--broker", "203.0.113.10"], None);
    c.args([
        "curl",
        "-sS",
        "--max-time",
        "80",
        "--limit-rate",
        "300k",
        &url("big"),
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let client = lab.spawn(&mut c).expect("spawn b1 client");
    let t0 = Instant::now();
    let relay = loop {
        let doc = status_json(brokerd(), &sock);
        let moving = doc["relays"].as_array().unwrap().iter().find(|r| {
            r["bytes_a_to_b"].as_u64().unwrap() + r["bytes_b_to_a"].as_u64().unwrap() > 100_000
        });
        if let Some(r) = moving {
            break r.clone();
        }
        assert!(t0.elapsed() < RUN, "no relay with bytes moving: {doc}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(relay["age_secs"].as_f64().unwrap() >= 0.0);
    let during = scrape(&lab, Host::P1, 9660);
    assert_eq!(metric(&during, "gcb_broker_relays_open"), 1.0, "{during}");
    let o = client.finish(RUN);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256(&o.stdout), sha256(&big), "relayed bytes intact");

    let doc = status_json(brokerd(), &sock);
    assert!(
        counter(&doc, "reverse") + counter(&doc, "direct") >= 1,
        "{doc}"
    );
    assert!(counter(&doc, "relay") >= 1, "{doc}");
    assert!(counter(&doc, "relay_bytes") >= big.len() as u64, "{doc}");
    let after = scrape(&lab, Host::P1, 9660);
    for m in [
        "gcb_broker_relayed_bytes_total",
        "gcb_broker_connects_total{route=\"relay\"}",
        "gcb_broker_control_datagrams_total",
        "gcb_broker_registered_total",
    ] {
        assert!(
            metric(&after, m) > metric(&before, m),
            "{m} did not increase"
        );
    }
    assert!(metric(&after, "gcb_broker_relayed_bytes_total") >= big.len() as f64);
    assert_eq!(
        metric(&after, "gcb_broker_registrations{proto=\"tcp\"}"),
        regs.len() as f64
    );
    // The human-readable tables name the registration too.
    let o = Command::new(brokerd())
        .args(["status", "--admin-socket", sock_s])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(&proxy.to_string()));
    // Other paths: 404.
    let o = lab
        .cmd(Host::P1, "curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:9660/",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "404");
    drop(broker);
}

#[test]
#[ignore = "needs root and the network lab"]
fn portfwd_status_lists_a_shim_mapping_and_metrics_match() {
    portfwd_bin();
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("status-dpf", &lab);
    let sock = dir.join("portfwd.sock");
    assert_no_daemon(portfwd_bin(), &sock, "gcb-portfwd");
    let sock_s = sock.to_str().unwrap();
    let _pf = Portfwd::start(
        &lab,
        &dir,
        &[
            "--private",
            "10.1.0.0/24",
            "--ports",
            "20000-20100",
            "--admin-socket",
            sock_s,
            "--metrics",
            "127.0.0.1:9661",
        ],
    );
    let mode = fs::metadata(&sock)
        .expect("admin socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");
    let before = scrape(&lab, Host::Gwa, 9661);
    assert_eq!(metric(&before, "gcb_portfwd_mappings{proto=\"tcp\"}"), 0.0);

    let out = dir.join("server.out");
    let mut cmd = gcb_run(&lab, Host::A1, true, &["--dpf", "10.1.0.1"], None);
    cmd.args([
        "python3",
        "-u",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "0.0.0.0",
    ])
    .current_dir(&*dir)
    .stdout(File::create(&out).unwrap())
    .stderr(File::create(dir.join("server.err")).unwrap());
    let _server = lab.spawn(&mut cmd).expect("spawn server");
    let line = wait_line(&out, UP, |l| l.starts_with("Serving HTTP on "))
        .unwrap_or_else(|| panic!("server: {}", read(&dir.join("server.err"))));
    let w: Vec<&str> = line.split_whitespace().collect();
    let public = format!("{}:{}", w[3], w[5]);
    assert!(public.starts_with("203.0.113.1:"), "{line}");

    let doc = status_json(portfwd_bin(), &sock);
    let maps = doc["mappings"].as_array().unwrap();
    let m = maps
        .iter()
        .find(|m| m["public"] == public.as_str())
        .unwrap_or_else(|| panic!("mapping {public} not listed: {doc}"));
    assert_eq!(m["proto"], "tcp");
    assert!(m["private"].as_str().unwrap().ends_with(":8000"), "{m}");
    assert!(m["private"].as_str().unwrap().starts_with("10.1.0."), "{m}");
    let after = scrape(&lab, Host::Gwa, 9661);
    let tcp = maps.iter().filter(|m| m["proto"] == "tcp").count();
    assert_eq!(
        metric(&after, "gcb_portfwd_mappings{proto=\"tcp\"}"),
        tcp as f64,
        "{after}"
    );
    assert_eq!(counter(&doc, "mappings"), maps.len() as u64);
    assert!(
        metric(&after, "gcb_portfwd_requests_total")
            > metric(&before, "gcb_portfwd_requests_total")
    );
    assert!(
        metric(&after, "gcb_portfwd_install_seconds_count") >= 1.0,
        "{after}"
    );
}
