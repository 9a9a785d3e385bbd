//! GCB with listening sockets shared by several processes, across the lab's NAT:
//! a pre-fork server whose parent closes its copy (the workers keep the registration
//! alive with their heartbeats and serve the broker's dial-backs), a daemon that hands its
//! socket to an exec'd image, and the end of a registration when its last holder closes.
//! Every transfer is checked with sha256 by the server and the client.

use gcb_lab::{gcb_run, sha256, wait_line_containing, Broker, Host, Lab, Proc, Scratch};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A server that answers each connection with the sha256 of what it read (until EOF),
/// then its worker tag and the peer address accept() reported.
const SERVE: &str = include_str!("programs/shared_serve.py");

const PREFORK: &str = include_str!("programs/shared_prefork.py");

const EXEC_PARENT: &str = include_str!("programs/shared_exec_parent.py");

const EXEC_CHILD: &str = include_str!("programs/shared_exec_child.py");

const CLOSE_AFTER_ONE: &str = include_str!("programs/shared_close_after_one.py");

struct Setup {
    // Processes die before the namespaces go.
    _broker: Broker,
    dir: Scratch,
    lab: Lab,
}

fn setup(broker_args: &[&str]) -> Setup {
    let lab = Lab::up();
    let dir = Scratch::new("shared", &lab);
    let mut args = vec!["--log", "debug"];
    args.extend_from_slice(broker_args);
    let broker = Broker::start(
        &lab,
        Host::P1,
        "203.0.113.10",
        true,
        &args,
        &dir.join("broker.log"),
    );
    Setup {
        _broker: broker,
        dir,
        lab,
    }
}

fn wait_for_file(path: &Path, needle: &str, timeout: Duration) -> String {
    wait_line_containing(path, needle, timeout)
}

impl Setup {
    /// Run a python server (SERVE + `body`) in a1 under gcb-run; stdout goes to `name.out`.
    fn server(&self, name: &str, body: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let script = self.dir.join(format!("{name}.py"));
        fs::write(&script, format!("{SERVE}\n{body}")).unwrap();
        let out = fs::File::create(self.dir.join(format!("{name}.out"))).unwrap();
        let log = self.dir.join(format!("{name}.shim.log"));
        let broker = ["--broker", "203.0.113.10"];
        let mut cmd = gcb_run(&self.lab, Host::A1, true, &broker, Some(("debug", &log)));
        cmd.args(["python3", "-u"])
            .arg(&script)
            .args(args)
            .stdout(out)
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.lab.spawn(&mut cmd).unwrap()
    }

    fn out_line(&self, name: &str, prefix: &str) -> String {
        let line = wait_for_file(
            &self.dir.join(format!("{name}.out")),
            prefix,
            Duration::from_secs(10),
        );
        line.trim_start_matches(prefix).trim().to_owned()
    }

    /// Send `payload` from `host` (under gcb-run if `gcb`) to `addr`; return the answer.
    fn send(&self, host: Host, gcb: bool, addr: &str, payload: &Path) -> String {
        let mut cmd: Command = if gcb {
            let mut c = gcb_run(&self.lab, host, true, &["--broker", "203.0.113.10"], None);
            c.arg("socat");
            c
        } else {
            self.lab.cmd(host, "socat")
        };
        cmd.args(["-t", "10", "-T", "15", "-"])
            .arg(format!("TCP4:{addr},shut-down"))
            .stdin(fs::File::open(payload).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = self
            .lab
            .spawn(&mut cmd)
            .unwrap()
            .finish(Duration::from_secs(20));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn payload(&self, n: usize) -> (PathBuf, String) {
        let data = gcb_lab::random_bytes(n);
        let p = self.dir.join(format!("payload-{n}"));
        fs::write(&p, &data).unwrap();
        (p, sha256(&data))
    }
}

#[test]
fn prefork_workers_keep_the_registration_and_serve_after_the_parent_closes() {
    // Short lease and heartbeat: the registration must outlive several leases on the
    // workers' heartbeats alone (the parent closed its copy and sits in wait()).
    let s = setup(&["--lease-ms", "1500"]);
    let _srv = s.server("prefork", PREFORK, &[], &[("GCB_HEARTBEAT_MS", "300")]);
    let addr = s.out_line("prefork", "ADDR");
    assert!(
        addr.starts_with("203.0.113.10:"),
        "getsockname() is not the proxy: {addr}"
    );
    let (payload, want) = s.payload(200_000);
    std::thread::sleep(Duration::from_secs(4)); // more than two leases
    let mut workers = std::collections::BTreeSet::new();
    for i in 0..9 {
        let (host, gcb) = match i % 3 {
            0 => (Host::P2, false), // plain client through the proxy
            1 => (Host::B1, true),  // other private network: relay
            _ => (Host::P2, true),  // public GCB client: reverse
        };
        let answer = s.send(host, gcb, &addr, &payload);
        let mut f = answer.split_whitespace();
        assert_eq!(
            f.next(),
            Some(want.as_str()),
            "connection {i} from {host:?}: {answer:?}"
        );
        workers.insert(f.next().unwrap_or("").to_owned());
    }
    assert!(
        workers.iter().all(|w| w.starts_with('w')),
        "answers came from {workers:?}"
    );
    let log = fs::read_to_string(s.dir.join("broker.log")).unwrap();
    assert!(!log.contains("expired"), "a lease expired:\n{log}");
}

#[test]
fn exec_handoff_keeps_the_proxy_address_and_serves() {
    let s = setup(&[]);
    let child = s.dir.join("child.py");
    fs::write(&child, format!("{SERVE}\n{EXEC_CHILD}")).unwrap();
    let _srv = s.server("execparent", EXEC_PARENT, &[child.to_str().unwrap()], &[]);
    let parent = s.out_line("execparent", "PARENT");
    let child_addr = s.out_line("execparent", "CHILD");
    assert!(parent.starts_with("203.0.113.10:"), "parent saw {parent}");
    assert_eq!(
        parent, child_addr,
        "the exec'd image must report the same proxy"
    );
    let (payload, want) = s.payload(300_000);
    for (host, gcb) in [(Host::P2, false), (Host::B1, true), (Host::A2, true)] {
        let answer = s.send(host, gcb, &child_addr, &payload);
        assert!(
            answer.starts_with(&format!("{want} child ")),
            "from {host:?}: {answer:?}"
        );
    }
}

#[test]
fn closing_the_last_copy_unregisters_and_the_proxy_refuses() {
    let s = setup(&[]);
    let _srv = s.server("closer", CLOSE_AFTER_ONE, &[], &[]);
    let addr = s.out_line("closer", "ADDR");
    let (payload, _) = s.payload(10);
    assert_eq!(s.send(Host::P2, false, &addr, &payload), "bye");
    s.out_line("closer", "CLOSED");
    let (ip, port) = addr.split_once(':').unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let t = Instant::now();
        let ok = s.lab.tcp_connects(Host::P2, ip, port.parse().unwrap());
        if !ok {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "refusal was not prompt"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxy {addr} still accepts after close"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::read_to_string(s.dir.join("broker.log")).unwrap();
    assert!(
        log.contains("unregister"),
        "broker never saw the unregister:\n{log}"
    );
}

/// An epoll program that closes its registered listener and keeps waiting on other fds:
/// the shim's control socket (added to the program's epoll set with a private tag while
/// the AEH was needed) must not show up in the program's events afterwards.
const EPOLL_AFTER_CLOSE: &str = include_str!("programs/shared_epoll_after_close.py");

#[test]
fn epoll_program_sees_no_shim_event_after_its_listener_closes() {
    let s = setup(&[]);
    let _srv = s.server("epoll", EPOLL_AFTER_CLOSE, &[], &[]);
    let addr = s.out_line("epoll", "ADDR");
    assert!(addr.starts_with("203.0.113.10:"), "not registered: {addr}");
    let stray = wait_for_file(&s.dir.join("epoll.out"), "STRAY", Duration::from_secs(15));
    assert_eq!(
        stray.trim(),
        "STRAY 0 []",
        "the program saw the shim's events"
    );
    let log = fs::read_to_string(s.dir.join("broker.log")).unwrap();
    assert!(
        log.contains("unregister"),
        "the listener never unregistered:\n{log}"
    );
}
