//! A pool of three brokers in the lab (issue 16): `GCB_BROKER=IP,IP,IP`.
//!
//! p1 holds two more public addresses (203.0.113.12 and .13) and runs one `gcb-brokerd`
//! on each of .10, .12 and .13, each with its own log and admin socket. Servers in a1 are
//! small python echo servers under `gcb-run` that print their listeners' getsockname()
//! whenever it changes (a thread polls it), so the test reads the address the program
//! would advertise, before and after a failover. Every byte is checked by sha256 at the
//! client. Which broker a listener registers with is computed here with the same
//! rendezvous ranking the shim uses (`gcb_proto::pool`, identity: the registered local
//! address and this machine's id), so the tests pick ports that land on given brokers.
//!
//! Needs root and the lab; run with `--include-ignored`.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use gcb_lab::{
    brokerd, gcb_run, gcb_run_script, libgcb, python, random_bytes, read_text as read, sha256,
    wait_until, Broker, Host, Lab, Logged, Scratch,
};
use gcb_proto::pool;
use serde_json::Value;

const BROKERS: [&str; 3] = ["203.0.113.10", "203.0.113.12", "203.0.113.13"];
const POOL: &str = "203.0.113.10,203.0.113.12,203.0.113.13";
const A1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
const UP: Duration = Duration::from_secs(20);
const RUN: Duration = Duration::from_secs(60);
/// The servers' heartbeat interval in these tests (GCB_HEARTBEAT_MS).
const HEARTBEAT_MS: u64 = 1000;

/// Echo server on the ports in argv; prints `name PORT IP:PORT` for each listener at
/// start and whenever its getsockname() changes.
const ECHO_SERVER: &str = r#"
import socket, sys, threading, time
def echo(c):
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.close()
def serve(ls):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
socks = []
for p in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(p)))
    s.listen(16)
    socks.append((int(p), s))
last = {}
for p, s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
while True:
    for p, s in socks:
        n = "%s:%d" % s.getsockname()
        if last.get(p) != n:
            print("name", p, n, flush=True)
            last[p] = n
    time.sleep(0.05)
"#;

/// Echo client: `ADDR PAYLOAD GO`: sends the first half, reads it back, prints `half`,
/// waits for the file GO (`-`: no wait), sends the rest and prints `sha ADDR HEX` of
/// everything echoed. More `ADDR PAYLOAD -` triples follow in turn.
const ECHO_CLIENT: &str = r#"
import socket, sys, hashlib, os, time
args = sys.argv[1:]
while args:
    addr, path, go = args[:3]
    args = args[3:]
    host, port = addr.rsplit(":", 1)
    data = open(path, "rb").read()
    s = socket.socket()
    s.connect((host, int(port)))
    s.settimeout(60)
    got = bytearray()
    def upto(n):
        while len(got) < n:
            b = s.recv(65536)
            if not b:
                sys.exit("eof after %d bytes from %s" % (len(got), addr))
            got.extend(b)
    half = len(data) // 2
    s.sendall(data[:half])
    upto(half)
    print("half", addr, flush=True)
    if go != "-":
        while not os.path.exists(go):
            time.sleep(0.05)
    s.sendall(data[half:])
    s.shutdown(socket.SHUT_WR)
    upto(len(data))
    while True:
        b = s.recv(65536)
        if not b:
            break
        got.extend(b)
    s.close()
    print("sha", addr, hashlib.sha256(got).hexdigest(), flush=True)
"#;

fn brokers() -> Vec<SocketAddrV4> {
    BROKERS
        .iter()
        .map(|b| SocketAddrV4::new(b.parse().unwrap(), 9650))
        .collect()
}

/// This machine's id as the shim reads it (the lab's namespaces share the file system).
fn host_id() -> Vec<u8> {
    let id = fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let id = id.trim();
    if !id.is_empty() {
        return id.as_bytes().to_vec();
    }
    let out = Command::new("hostname").output().expect("hostname");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .as_bytes()
        .to_vec()
}

/// The order of the pool's brokers for a listener of a1 on `port` (0.0.0.0:port
/// registers as a1's address on the route to the pool).
fn order(port: u16) -> Vec<SocketAddrV4> {
    pool::rank(
        &brokers(),
        pool::identity(SocketAddrV4::new(A1, port), &host_id()),
    )
}

/// The first port from `from` whose order starts with `first` (and, if given, continues
/// with `second`).
fn port_for(from: u16, first: usize, second: Option<usize>) -> u16 {
    let b = brokers();
    (from..from + 2000)
        .find(|p| {
            let o = order(*p);
            o[0] == b[first] && second.is_none_or(|s| o[1] == b[s])
        })
        .expect("a port for that order")
}

struct Rig {
    dir: Scratch,
    lab: Lab,
    brokers: Vec<Broker>,
}

impl Rig {
    fn up() -> Rig {
        brokerd();
        libgcb();
        gcb_run_script();
        let lab = Lab::up();
        let dir = Scratch::new("pool", &lab);
        for ip in &BROKERS[1..] {
            let out = lab.sh(
                Host::P1,
                &format!("ip addr add {ip}/24 dev eth0"),
                Duration::from_secs(5),
            );
            assert!(out.status.success(), "add {ip} to p1: {out:?}");
        }
        let brokers = BROKERS
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                Broker::start(
                    &lab,
                    Host::P1,
                    ip,
                    true,
                    &[],
                    &dir.join(format!("broker{i}.log")),
                )
            })
            .collect();
        Rig { dir, lab, brokers }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn payload(&self, name: &str, n: usize) -> (PathBuf, String) {
        let data = random_bytes(n);
        let p = self.path(name);
        fs::write(&p, &data).expect("write payload");
        (p, sha256(&data))
    }

    /// The echo server on `ports` in a1 under gcb-run with the pool `broker` (given in
    /// GCB_BROKER: gcb-run's --broker refuses a list with a bad entry outright).
    fn server(&self, broker: &str, ports: &[u16]) -> Logged {
        let log = self.path("server.shim.log");
        let mut c = gcb_run(&self.lab, Host::A1, true, &[], Some(("debug", &log)));
        c.env("GCB_BROKER", broker);
        c.env("GCB_HEARTBEAT_MS", HEARTBEAT_MS.to_string())
            .args([python(), "-c", ECHO_SERVER])
            .args(ports.iter().map(u16::to_string));
        self.lab.spawn_logged(&mut c, &self.dir, "server")
    }

    /// The echo client in `host`, under gcb-run with the pool (`gcb`) or plain.
    fn client(&self, host: Host, gcb: bool, name: &str, args: &[String]) -> Logged {
        let mut c = if gcb {
            let log = self.path(&format!("{name}.shim.log"));
            let mut c = gcb_run(
                &self.lab,
                host,
                true,
                &["--broker", POOL],
                Some(("debug", &log)),
            );
            c.arg(python());
            c
        } else {
            self.lab.cmd(host, python())
        };
        c.args(["-c", ECHO_CLIENT]).args(args);
        self.lab.spawn_logged(&mut c, &self.dir, name)
    }

    fn status(&self, i: usize) -> Value {
        let out = Command::new(brokerd())
            .args(["status", "--json", "--admin-socket"])
            .arg(self.brokers[i].log.with_extension("sock"))
            .output()
            .expect("run status");
        assert!(
            out.status.success(),
            "status of broker {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json")
    }

    fn counter(&self, i: usize, name: &str) -> u64 {
        let doc = self.status(i);
        doc["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {doc}"))
    }
}

/// The address the server's listener on `port` reports (its latest line), once that is
/// on a broker's IP other than `not`.
fn wait_name(server: &Logged, port: u16, not: Option<Ipv4Addr>, timeout: Duration) -> SocketAddrV4 {
    let mut found = None;
    wait_until(
        &format!("server's listener {port} on a broker"),
        timeout,
        || {
            found = read(&server.out)
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("name {port} ")))
                .filter_map(|a| a.trim().parse::<SocketAddrV4>().ok())
                .next_back()
                .filter(|a| BROKERS.contains(&a.ip().to_string().as_str()) && Some(*a.ip()) != not);
            found.is_some()
        },
    );
    found.unwrap()
}

/// Waits for `client` to finish and checks each `sha ADDR HEX` line against `want`.
fn finish_client(mut client: Logged, want: &[(SocketAddrV4, &str)], what: &str) {
    let st = client.proc.wait_timeout(RUN).expect("wait client");
    let out = read(&client.out);
    assert!(
        st.is_some_and(|s| s.success()),
        "{what}: client failed ({st:?}):\n{out}\n{}",
        read(&client.err)
    );
    for (addr, sha) in want {
        assert!(
            out.contains(&format!("sha {addr} {sha}")),
            "{what}: bytes through {addr} not intact:\n{out}\n{}",
            read(&client.err)
        );
    }
}

fn wait_half(client: &Logged, what: &str) {
    wait_until(what, RUN, || read(&client.out).contains("half "));
}

/// A server under gcb-run whose broker is killed (kill -9) is reachable again through
/// its new proxy address, on the next broker of its order, with its bytes intact; a
/// connection open before the kill that was not relayed through the killed broker (a
/// same-network direct one, and one relayed by another broker of the pool) stays up and
/// delivers every byte.
#[test]
#[ignore = "needs root and the network lab"]
fn pool_failover_to_next_broker_keeps_other_connections() {
    let rig = Rig::up();
    let b = brokers();
    // Port `moving` ranks broker 0 first and broker 1 second; port `staying` is on
    // broker 2 (it must not move).
    let moving = port_for(20000, 0, Some(1));
    let staying = port_for(21000, 2, None);
    // A bad entry in the list is left out and said once; the rest is the pool.
    let server = rig.server(&format!("{POOL},bogus:1"), &[moving, staying]);
    let before = wait_name(&server, moving, None, UP);
    let other = wait_name(&server, staying, None, UP);
    assert_eq!(
        *before.ip(),
        *b[0].ip(),
        "first registration on the first broker of its order"
    );
    assert_eq!(*other.ip(), *b[2].ip());
    let (p0, sha0) = rig.payload("before.bin", 1 << 20);

    // Open before the kill: a2 -> a1 direct (same network), p2 -> broker 2's proxy
    // (relayed by broker 2), and p2 -> broker 0's proxy (relayed by the broker killed).
    let go = rig.path("go");
    let go_s = go.display().to_string();
    let p0_s = p0.display().to_string();
    let direct = rig.client(
        Host::A2,
        true,
        "direct",
        &[before.to_string(), p0_s.clone(), go_s.clone()],
    );
    let relayed = rig.client(
        Host::P2,
        false,
        "relayed2",
        &[other.to_string(), p0_s.clone(), go_s.clone()],
    );
    let doomed = rig.client(
        Host::P2,
        false,
        "relayed0",
        &[before.to_string(), p0_s.clone(), go_s.clone()],
    );
    wait_half(&direct, "direct connection half way");
    wait_half(&relayed, "relayed connection half way");
    wait_half(&doomed, "connection through broker 0 half way");
    assert!(
        read(&rig.path("direct.shim.log")).contains("Direct"),
        "a2 -> a1 must be direct:\n{}",
        read(&rig.path("direct.shim.log"))
    );

    let mut rig = rig;
    let mut killed = rig.brokers.remove(0);
    killed.proc.signal_group(libc::SIGKILL);
    let t0 = Instant::now();
    assert!(killed
        .proc
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .is_some());
    let after = wait_name(&server, moving, Some(*b[0].ip()), Duration::from_secs(60));
    let moved_in = t0.elapsed();
    assert_eq!(
        *after.ip(),
        *b[1].ip(),
        "moved to the second broker of its order"
    );
    // Reachable through the new address, bytes intact (plain client on p2).
    let (p1, sha1) = rig.payload("after.bin", 1 << 20);
    let fresh = rig.client(
        Host::P2,
        false,
        "after",
        &[after.to_string(), p1.display().to_string(), "-".into()],
    );
    finish_client(fresh, &[(after, &sha1)], "through the new proxy");
    let reachable_in = t0.elapsed();
    eprintln!(
        "failover: new proxy {after} (was {before}) reported after {moved_in:?}, reachable after {reachable_in:?} (heartbeat {HEARTBEAT_MS} ms)"
    );
    // The listener on broker 2 did not move.
    assert_eq!(wait_name(&server, staying, None, UP), other);
    assert_eq!(
        read(&server.out)
            .matches(&format!("name {staying} "))
            .count(),
        1,
        "{}",
        read(&server.out)
    );

    // The open connections finish: direct and broker-2-relayed intact; the one relayed
    // by the killed broker is gone.
    fs::write(&go, b"go").unwrap();
    finish_client(
        direct,
        &[(before, &sha0)],
        "direct connection open across the kill",
    );
    finish_client(
        relayed,
        &[(other, &sha0)],
        "broker 2 relay open across the kill",
    );
    let mut doomed = doomed;
    let st = doomed.proc.wait_timeout(RUN).unwrap();
    assert!(
        !st.is_some_and(|s| s.success()),
        "a connection relayed by the killed broker cannot survive it:\n{}",
        read(&doomed.out)
    );
    let shim = read(&rig.path("server.shim.log"));
    let said = format!("{}{shim}", read(&server.err));
    assert_eq!(
        said.lines()
            .filter(|l| l.contains("left out") && l.contains("bogus:1"))
            .count(),
        1,
        "the bad entry is said once:\n{said}"
    );
    assert!(
        shim.contains(&format!("broker {} lost; registering with {}", b[0], b[1])),
        "server shim log:\n{shim}"
    );
    // Broker 1 (now rig.brokers[0]) logged the moved registration.
    assert!(
        rig.brokers[0]
            .text()
            .contains(&format!("registered tcp listener local {A1}:{moving} ")),
        "{}",
        rig.brokers[0].text()
    );

    // No flapping: broker 0 comes back; the listener stays on broker 1 for five
    // heartbeat intervals (it would have moved back within two).
    let back = Broker::start(
        &rig.lab,
        Host::P1,
        BROKERS[0],
        true,
        &[],
        &rig.path("broker0-again.log"),
    );
    std::thread::sleep(Duration::from_millis(5 * HEARTBEAT_MS));
    assert_eq!(
        read(&server.out)
            .matches(&format!("name {moving} "))
            .count(),
        2,
        "the listener moved again after its first broker came back:\n{}",
        read(&server.out)
    );
    assert!(
        !back.text().contains(&format!("local {A1}:{moving} ")),
        "{}",
        back.text()
    );
    // Broker 1 fails in turn: the listener moves on to the next of its order, broker 2.
    let mut b1 = rig.brokers.remove(0);
    b1.proc.signal_group(libc::SIGKILL);
    assert!(b1
        .proc
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .is_some());
    let third = wait_name(&server, moving, Some(*b[1].ip()), Duration::from_secs(60));
    assert_eq!(
        *third.ip(),
        *b[2].ip(),
        "after broker 1, broker 2 (its order)"
    );
    let (p2, sha2) = rig.payload("third.bin", 256 << 10);
    let c = rig.client(
        Host::P2,
        false,
        "third",
        &[third.to_string(), p2.display().to_string(), "-".into()],
    );
    finish_client(c, &[(third, &sha2)], "through the third proxy");
}

/// A pre-fork server: the parent listens, four workers accept, the parent waits in
/// select(); every process runs the AEH and heartbeats on the registration channel they
/// share. Prints `name PORT IP:PORT` from the parent when it changes.
const PREFORK_SERVER: &str = r#"
import os, select, socket, sys, time
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(16)
for i in range(4):
    if os.fork() == 0:
        while True:
            c, _ = s.accept()
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
            c.close()
last = None
while True:
    select.select([], [], [], 0.05)
    n = "%s:%d" % s.getsockname()
    if n != last:
        print("name", port, n, flush=True)
        last = n
"#;

/// A listener shared by pre-fork workers is not moved off a live broker: the processes
/// share the registration channel's socket, so one may read the answer to another's
/// heartbeat; a heartbeat that went unanswered that way must not count as a lost broker
/// (the shim probes the broker on its own private channel first). 60 heartbeat intervals
/// of 200 ms with five processes: no move, and the proxy serves throughout.
#[test]
#[ignore = "needs root and the network lab"]
fn pool_prefork_workers_do_not_leave_a_live_broker() {
    let rig = Rig::up();
    let port = port_for(24000, 0, None);
    let log = rig.path("prefork.shim.log");
    let mut c = gcb_run(&rig.lab, Host::A1, true, &[], Some(("debug", &log)));
    c.env("GCB_BROKER", POOL)
        .env("GCB_HEARTBEAT_MS", "200")
        .args([python(), "-c", PREFORK_SERVER, &port.to_string()]);
    let server = rig.lab.spawn_logged(&mut c, &rig.dir, "prefork");
    let proxy = wait_name(&server, port, None, UP);
    assert_eq!(proxy.ip().to_string(), BROKERS[0]);
    let (pl, sha) = rig.payload("small.bin", 64);
    for round in 0..6 {
        std::thread::sleep(Duration::from_secs(2));
        let c = rig.client(
            Host::P2,
            false,
            &format!("prefork-client{round}"),
            &[proxy.to_string(), pl.display().to_string(), "-".into()],
        );
        finish_client(c, &[(proxy, &sha)], "through the pre-fork server's proxy");
    }
    let shim = read(&log);
    assert!(
        !shim.contains("lost; registering with"),
        "a live broker was left:\n{}",
        shim.lines()
            .filter(|l| l.contains("lost") || l.contains("stopped answering"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        read(&server.out).matches(&format!("name {port} ")).count(),
        1,
        "{}",
        read(&server.out)
    );
}

/// `/etc/netns/NS/hosts` for one lab namespace (`ip netns exec` mounts it over
/// `/etc/hosts`), removed when dropped.
struct NetnsHosts(PathBuf);

impl NetnsHosts {
    fn new(ns: &str, text: &str) -> NetnsHosts {
        let dir = PathBuf::from("/etc/netns").join(ns);
        fs::create_dir_all(&dir).expect("create /etc/netns/NS");
        fs::write(dir.join("hosts"), text).expect("write the namespace's hosts file");
        NetnsHosts(dir)
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A GCB client configured with the pool reaches proxies of every broker with the
/// route the owning broker decides: a punched TCP connection from b1 (both behind NATs,
/// home-router gateways), direct from a2
/// (a1's network), reverse from p2 (public connector); each broker counts exactly its
/// own decisions. The server names its pool by one DNS name with three A records (a
/// hosts file of its namespace, read by getaddrinfo), the clients by the list.
#[test]
#[ignore = "needs root and the network lab"]
fn pool_client_reaches_proxies_of_every_broker() {
    let rig = Rig::up();
    // Home-router gateways, so that b1's TCP punch through both NATs works (issue #15):
    // punching goes through the broker that owns each proxy too.
    rig.lab.cpe(true);
    let ports: Vec<u16> = (0..3)
        .map(|i| port_for(22000 + 1000 * i as u16, i, None))
        .collect();
    let hosts: String = BROKERS
        .iter()
        .map(|b| format!("{b} gcb-pool-brokers\n"))
        .collect();
    let _hosts = NetnsHosts::new(
        &rig.lab.ns(Host::A1),
        &format!("127.0.0.1 localhost\n{hosts}"),
    );
    let server = rig.server("gcb-pool-brokers", &ports);
    // gcb-run --check probes every broker of the pool (through the DNS name).
    let mut chk = gcb_run(
        &rig.lab,
        Host::A1,
        true,
        &["--broker", "gcb-pool-brokers", "--check"],
        None,
    );
    let out = rig
        .lab
        .spawn(
            chk.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
        .expect("spawn gcb-run --check")
        .finish(RUN);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gcb-run --check: {said}");
    for b in brokers() {
        assert!(said.contains(&format!("broker {b}: answering")), "{said}");
    }
    let proxies: Vec<SocketAddrV4> = ports
        .iter()
        .map(|p| wait_name(&server, *p, None, UP))
        .collect();
    for (i, p) in proxies.iter().enumerate() {
        assert_eq!(
            p.ip().to_string(),
            BROKERS[i],
            "listener {} on broker {i}",
            ports[i]
        );
    }
    let (pl, sha) = rig.payload("p.bin", 512 << 10);
    let pl = pl.display().to_string();
    let args: Vec<String> = proxies
        .iter()
        .flat_map(|p| [p.to_string(), pl.clone(), "-".to_owned()])
        .collect();
    let want: Vec<(SocketAddrV4, &str)> = proxies.iter().map(|p| (*p, sha.as_str())).collect();
    let before: Vec<[u64; 3]> = (0..3)
        .map(|i| ["direct", "reverse", "punched"].map(|c| rig.counter(i, c)))
        .collect();
    for (host, name, route) in [
        (Host::B1, "b1", "Punch"),
        (Host::A2, "a2", "Direct"),
        (Host::P2, "p2", "Reverse"),
    ] {
        let c = rig.client(host, true, name, &args);
        finish_client(c, &want, &format!("{name} through the pool"));
        let log = read(&rig.path(&format!("{name}.shim.log")));
        for (i, p) in proxies.iter().enumerate() {
            let line = log
                .lines()
                .find(|l| l.contains(&format!("connect {p} via broker {}", b_of(i))))
                .unwrap_or_else(|| panic!("{name}: no decision for {p} from broker {i}:\n{log}"));
            assert!(line.contains(route), "{name} -> {p}: want {route}: {line}");
        }
    }
    for (i, was) in before.iter().enumerate() {
        let after = ["direct", "reverse", "punched"].map(|c| rig.counter(i, c));
        assert_eq!(
            [after[0] - was[0], after[1] - was[1], after[2] - was[2]],
            [1, 1, 1],
            "broker {i}: one direct, one reverse decision, one punched connection"
        );
    }
}

fn b_of(i: usize) -> SocketAddrV4 {
    brokers()[i]
}
