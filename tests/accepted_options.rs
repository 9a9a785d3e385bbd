//! Issue #12 item 2, the identity model's accepted connections: what a server reads from a
//! connection that reached it through the broker is what a connection accepted on its
//! listener's interface shows. A python server (`programs/acc_server.py`) in a1 under
//! `gcb-run --broker` (broker on p1) sets IP_PKTINFO, SO_KEEPALIVE and TCP_NODELAY on its
//! listener and prints, per accepted connection, SO_DOMAIN, SO_KEEPALIVE, TCP_NODELAY, the
//! interface IP_PKTOPTIONS reports and its names. A connection from p2 to the proxy (relayed:
//! underneath, a connection the shim dialed) must show what a connection from a2 to the
//! server's real address (the kernel's accept, same LAN) shows, except the addresses, which
//! follow the identity model (getsockname: the proxy for the brokered one).
//!
//! Needs root and a release build of the workspace (a missing artifact is a failure).

use std::fs;
use std::time::Duration;

use gcb_lab::{gcb_run, python, read_text, wait_line, Broker, Host, Lab, Proc, Scratch};
use serde_json::Value;

const SERVER: &str = include_str!("programs/acc_server.py");
const P1: &str = "203.0.113.10";
const A1: &str = "10.1.0.11";
const PORT: u16 = 7311;
const UP: Duration = Duration::from_secs(10);

/// Connects from `host` to `addr:port`, sends `tag`, and waits for the server's `ok`.
fn client(lab: &Lab, host: Host, addr: &str, port: u16, tag: &str) {
    let code = format!(
        "import socket; c = socket.create_connection(('{addr}', {port}), timeout=20); \
         c.sendall(b'{tag}\\n'); assert c.makefile('rb').readline() == b'ok\\n'"
    );
    let out = lab.run(host, python(), ["-c", &code], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "client {tag} from {host} to {addr}:{port} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The server's report for the connection tagged `tag`.
fn report(out: &std::path::Path, tag: &str, shim_log: &std::path::Path) -> Value {
    let needle = format!("\"tag\": \"{tag}\"");
    let line = wait_line(out, UP, |l| l.contains(&needle)).unwrap_or_else(|| {
        panic!(
            "server printed nothing for {tag}: stdout {}\nshim log tail: {}",
            read_text(out),
            gcb_lab::tail(&read_text(shim_log), 40)
        )
    });
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad report {line:?}: {e}"))
}

/// Runs the server of `family` (4 or 6) under GCB, connects to it from p2 through its proxy
/// and from a2 directly, and returns (brokered, kernel-accepted, proxy port).
fn brokered_and_kernel(tag: &str, family: &str) -> (Value, Value, u16, Lab, Scratch, Broker, Proc) {
    let lab = Lab::up();
    let dir = Scratch::new(tag, &lab);
    let broker = Broker::start(&lab, Host::P1, P1, true, &[], &dir.join("broker.log"));
    let script = dir.join("acc_server.py");
    fs::write(&script, SERVER).unwrap();
    let out = dir.join("server.out");
    let shim_log = dir.join("server.shim.log");
    let mut cmd = gcb_run(
        &lab,
        Host::A1,
        true,
        &["--broker", P1],
        Some(("debug", &shim_log)),
    );
    cmd.arg(python())
        .arg("-u")
        .arg(&script)
        .args([family, &PORT.to_string()])
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(dir.join("server.err")).unwrap());
    let server = lab.spawn(&mut cmd).expect("spawn server");
    let line = wait_line(&out, UP, |l| l.starts_with("listening ")).unwrap_or_else(|| {
        panic!(
            "server did not start: {}\n{}",
            read_text(&dir.join("server.err")),
            read_text(&shim_log)
        )
    });
    // "listening ('203.0.113.10', 40001)" or "listening ('::ffff:203.0.113.10', 40001, 0, 0)"
    let proxy_port: u16 = line
        .split(", ")
        .nth(1)
        .and_then(|p| p.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    assert!(
        line.contains(&format!("'{}'", P1)) || line.contains(&format!("'::ffff:{P1}'")),
        "the listener reports its proxy on {P1}: {line}"
    );
    client(&lab, Host::P2, P1, proxy_port, "p2");
    client(&lab, Host::A2, A1, PORT, "a2");
    let brokered = report(&out, "p2", &shim_log);
    let kernel = report(&out, "a2", &shim_log);
    eprintln!("brokered: {brokered}\nkernel-accepted: {kernel}");
    (brokered, kernel, proxy_port, lab, dir, broker, server)
}

#[test]
fn brokered_connection_reads_like_a_kernel_accepted_one() {
    let (b, k, proxy_port, _lab, _dir, _broker, _server) = brokered_and_kernel("accopt4", "4");
    assert_eq!(k["domain"], libc::AF_INET, "the kernel's accept: {k}");
    assert_eq!(b["domain"], k["domain"], "SO_DOMAIN");
    assert_eq!(
        k["keepalive"], 1,
        "the kernel copies SO_KEEPALIVE from the listener: {k}"
    );
    assert_eq!(b["keepalive"], k["keepalive"], "SO_KEEPALIVE");
    assert_eq!(
        k["nodelay"], 1,
        "the kernel copies TCP_NODELAY from the listener: {k}"
    );
    assert_eq!(b["nodelay"], k["nodelay"], "TCP_NODELAY");
    assert!(
        k["ifindex"].as_i64().unwrap_or(0) > 0,
        "the kernel's accept reports its arrival interface: {k}"
    );
    assert_eq!(
        (&b["ifindex"], &b["ifname"]),
        (&k["ifindex"], &k["ifname"]),
        "IP_PKTOPTIONS: the interface the connection arrived on"
    );
    // The addresses follow the identity model.
    assert_eq!(
        k["sock"],
        serde_json::json!([A1, PORT]),
        "kernel: the real address"
    );
    assert_eq!(k["peer"][0], "10.1.0.12", "kernel: a2");
    assert_eq!(
        b["sock"],
        serde_json::json!([P1, proxy_port]),
        "brokered: the proxy"
    );
    assert_eq!(b["peer"][0], "203.0.113.11", "brokered: p2, the real peer");
}

#[test]
fn dual_stack_listener_brokered_connection_is_af_inet6() {
    let (b, k, proxy_port, _lab, _dir, _broker, _server) = brokered_and_kernel("accopt6", "6");
    assert_eq!(k["domain"], libc::AF_INET6, "the kernel's accept: {k}");
    assert_eq!(
        b["domain"],
        libc::AF_INET6,
        "SO_DOMAIN of the brokered connection: {b}"
    );
    assert_eq!(b["keepalive"], k["keepalive"], "SO_KEEPALIVE");
    assert_eq!(b["nodelay"], k["nodelay"], "TCP_NODELAY");
    assert!(k["ifindex"].as_i64().unwrap_or(0) > 0, "kernel: {k}");
    assert_eq!(
        b["ifindex"], k["ifindex"],
        "IP_PKTOPTIONS arrival interface"
    );
    assert_eq!(
        b["sock"],
        serde_json::json!([format!("::ffff:{P1}"), proxy_port]),
        "brokered: the proxy, IPv4-mapped"
    );
    assert_eq!(
        b["peer"][0], "::ffff:203.0.113.11",
        "brokered: p2, IPv4-mapped"
    );
    assert_eq!(k["peer"][0], "::ffff:10.1.0.12", "kernel: a2, IPv4-mapped");
}
