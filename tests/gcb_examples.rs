//! The example programs (crate `gcb-examples`) across the lab's NAT, under GCB.
//!
//! The programs are plain-socket "legacy" programs with no GCB awareness; they are started
//! with `scripts/gcb-run --broker 203.0.113.10` (LD_PRELOAD=libgcb.so), the broker
//! (`gcb-brokerd`) runs on p1. Two scenarios:
//!
//! * echo (paper section 5): the echo server in a1 advertises the broker's proxy address;
//!   clients reach it from the public network (with and without the shim), from the other
//!   private network (b1) and from its own private network (a2), with 20 x 64 KiB echoes
//!   verified byte for byte. Without GCB the server is unreachable from outside.
//! * mini grid pool (HTCondor-like): a collector on p1, workers in a1, b1 (under GCB) and
//!   p2 (plain) advertise their getsockname() address; schedulers on p2 (plain), a2 and b1
//!   (under GCB) run sha256-verified jobs on every worker.
//!
//! Needs root and the release build (`cargo build --release --workspace`); missing
//! artifacts fail the test. Logs (broker, shim debug logs, program stderr) go to
//! `/tmp/gcb-examples-<lab>/` and are printed (and kept) when a test fails; they are removed
//! after a passing test unless `GCB_TEST_KEEP` is set. `GCB_EXAMPLES_LOG` sets the
//! shim log level (default debug).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use gcb_lab::{artifact, gcb_run, tail, Broker, Host, Lab, Proc, Scratch};
use serde_json::Value as Json;

const BROKER: &str = "203.0.113.10";
const BROKER_PORT: u16 = 9650;
const T: Duration = Duration::from_secs(15);
const CLIENT_T: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// harness

/// A lab plus a log directory that is dumped to stderr if the test panics.
struct Env {
    /// The collector the schedulers ask, when not [`COLLECTOR`].
    collector: Option<String>,
    // Declared before `lab`: processes die before the namespaces go.
    broker: Option<Broker>,
    procs: Vec<Proc>,
    logs: Scratch,
    lab: Lab,
}

impl Env {
    fn up() -> Env {
        let lab = Lab::up();
        let logs = Scratch::new("examples", &lab);
        Env {
            collector: None,
            broker: None,
            procs: Vec::new(),
            logs,
            lab,
        }
    }

    fn log(&self, tag: &str) -> PathBuf {
        self.logs.join(format!("{tag}.log"))
    }

    fn log_file(&self, tag: &str) -> File {
        File::create(self.log(tag)).expect("create log file")
    }

    /// `PROGRAM` (a release artifact of gcb-examples) in `host`, without the shim.
    fn plain(&self, host: Host, program: &str) -> Command {
        self.lab.cmd(host, artifact(program))
    }

    /// `PROGRAM` in `host` under `gcb-run --broker 203.0.113.10`, shim log in `TAG.shim.log`.
    fn gcb(&self, host: Host, program: &str, tag: &str) -> Command {
        let level = std::env::var("GCB_EXAMPLES_LOG").unwrap_or_else(|_| "debug".into());
        let log = self.log(&format!("{tag}.shim"));
        let mut cmd = gcb_run(
            &self.lab,
            host,
            true,
            &["--broker", BROKER],
            Some((&level, &log)),
        );
        cmd.arg(artifact(program));
        cmd
    }

    /// Starts gcb-brokerd on p1 (killing the running one first, if any) and waits until
    /// it serves.
    fn start_broker(&mut self) {
        let tag = match self.broker.take() {
            Some(mut old) => {
                old.proc.kill().expect("kill gcb-brokerd");
                "broker.restarted"
            }
            None => "broker",
        };
        let log = self.log(&format!("{tag}.err"));
        let mut broker =
            Broker::start(&self.lab, Host::P1, BROKER, true, &["--log", "debug"], &log);
        let ready = self
            .lab
            .wait_for_udp_bind(Host::P1, BROKER_PORT, T)
            .and_then(|()| self.lab.wait_for_tcp_listen(Host::P1, BROKER_PORT, T));
        // The ports being bound is not proof that this broker bound them.
        let exited = broker
            .proc
            .wait_timeout(Duration::from_millis(100))
            .ok()
            .flatten();
        self.broker = Some(broker);
        if let Err(e) = ready {
            panic!("gcb-brokerd not serving: {e}");
        }
        assert!(exited.is_none(), "gcb-brokerd exited: {exited:?}");
    }

    /// Spawns a long-running program whose stderr goes to `TAG.err.log`, and returns the
    /// first line it prints on stdout (the rest of stdout is drained and discarded).
    fn start(&mut self, mut cmd: Command, tag: &str) -> String {
        cmd.stdout(Stdio::piped())
            .stderr(self.log_file(&format!("{tag}.err")));
        let mut proc = self
            .lab
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawn {tag}: {e}"));
        let out = proc.child_mut().stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(T);
        let exited = proc.wait_timeout(Duration::ZERO).ok().flatten();
        self.procs.push(proc);
        match line {
            Ok(line) => line,
            Err(_) => panic!(
                "{tag} printed no line within {T:?} (exit status {exited:?}); stderr:\n{}",
                read_log(&self.log(&format!("{tag}.err")))
            ),
        }
    }

    /// Runs a short-lived program to completion (killed after `timeout`).
    fn run(&self, mut cmd: Command, timeout: Duration) -> Output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.lab
            .spawn(&mut cmd)
            .expect("spawn client")
            .capture()
            .finish(timeout)
    }

    /// Asserts that every long-running program (broker, servers, workers) is still alive.
    fn assert_alive(&mut self) {
        for (i, p) in self
            .procs
            .iter_mut()
            .chain(self.broker.as_mut().map(|b| &mut b.proc))
            .enumerate()
        {
            let status = p.wait_timeout(Duration::ZERO).expect("wait");
            assert!(status.is_none(), "process #{i} exited early: {status:?}");
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // The scratch dir removes itself after a passing test (kept with GCB_TEST_KEEP).
        if !std::thread::panicking() {
            return;
        }
        for p in self
            .procs
            .iter_mut()
            .chain(self.broker.as_mut().map(|b| &mut b.proc))
        {
            let _ = p.kill();
        }
        eprintln!("==== logs in {} ====", self.logs.display());
        let mut files: Vec<_> = std::fs::read_dir(&*self.logs)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            eprintln!(
                "---- {} ----\n{}",
                f.file_name().unwrap_or_default().to_string_lossy(),
                tail(&read_log(&f), 60)
            );
        }
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

/// The JSON line a client printed, parsed; panics with everything it printed if it failed.
fn json_result(what: &str, out: &Output) -> Json {
    let stdout = text(&out.stdout);
    let describe = || {
        format!(
            "{what}: status {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            text(&out.stderr)
        )
    };
    let line = stdout.lines().last().unwrap_or_default();
    let json: Json =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{} (bad JSON: {e})", describe()));
    assert!(out.status.success(), "{}", describe());
    assert_eq!(json["ok"], Json::Bool(true), "{}", describe());
    println!("{what}: {line}");
    json
}

// ---------------------------------------------------------------------------------------
// reading the examples' JSON results (serde_json)

/// Typed access to a field the example must have printed: panics naming what it found.
trait JsonField {
    fn num(&self) -> f64;
    fn str(&self) -> &str;
    fn arr(&self) -> &[Json];
}

impl JsonField for Json {
    fn num(&self) -> f64 {
        self.as_f64()
            .unwrap_or_else(|| panic!("not a number: {self:?}"))
    }

    fn str(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self:?}"))
    }

    fn arr(&self) -> &[Json] {
        self.as_array()
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("not an array: {self:?}"))
    }
}

#[test]
fn json_reader_reads_what_the_examples_print() {
    let j: Json = serde_json::from_str(
        r#"{"ok":true,"n":-1.5e2,"s":"a\"b\u00e9","a":[1,{"x":null}],"e":[],"o":{}}"#,
    )
    .unwrap();
    assert_eq!(j["ok"], Json::Bool(true));
    assert_eq!(j["n"].num(), -150.0);
    assert_eq!(j["s"].str(), "a\"bé");
    assert_eq!(j["a"].arr()[1]["x"], Json::Null);
    assert!(j["e"].arr().is_empty());
    assert_eq!(j["missing"], Json::Null);
    assert!(serde_json::from_str::<Json>("{\"ok\":true} x").is_err());
    assert!(serde_json::from_str::<Json>("{\"ok\":").is_err());
}

// ---------------------------------------------------------------------------------------
// echo

fn echo_client(env: &Env, from: Host, shim: bool, addr: &str, extra: &[&str]) -> Json {
    let tag = format!("echo-client-{from}{}", if shim { "-gcb" } else { "" });
    let mut cmd = if shim {
        env.gcb(from, "gcb-echo-client", &tag)
    } else {
        env.plain(from, "gcb-echo-client")
    };
    cmd.arg(addr).args(extra);
    let out = env.run(cmd, CLIENT_T);
    json_result(&tag, &out)
}

#[test]
fn echo_suite_reaches_a_private_server_through_the_broker() {
    let mut env = Env::up();
    env.start_broker();

    // The server in a1 under GCB advertises the broker's proxy address.
    let cmd = {
        let mut c = env.gcb(Host::A1, "gcb-echo-server", "echo-server");
        c.args(["--bind", "0.0.0.0:7000"]);
        c
    };
    let line = env.start(cmd, "echo-server");
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("echo server printed {line:?}"))
        .to_owned();
    assert!(
        addr.starts_with(&format!("{BROKER}:")) && addr != format!("{BROKER}:{BROKER_PORT}"),
        "the server under GCB must advertise a proxy address on the broker, got {addr}"
    );
    env.lab
        .wait_for_tcp_listen(Host::A1, 7000, T)
        .expect("the real listening socket in a1");

    // Every pattern of the paper: public -> private with a regular and a GCB client,
    // private -> other private, and the same private network.
    let args = ["--size", "65536", "--count", "20"];
    for (from, shim) in [
        (Host::P2, false),
        (Host::P2, true),
        (Host::B1, true),
        (Host::A2, true),
    ] {
        let r = echo_client(&env, from, shim, &addr, &args);
        assert_eq!(r["echoes"].num(), 20.0, "{from} shim={shim}");
        assert_eq!(r["connections"].num(), 20.0, "{from} shim={shim}");
        assert_eq!(r["bytes"].num(), 20.0 * 65536.0, "{from} shim={shim}");
    }
    // Bulk on one connection, both ways through the NATs.
    let bulk = ["--size", "1048576", "--count", "4", "--one-connection"];
    let r = echo_client(&env, Host::B1, true, &addr, &bulk);
    assert_eq!(r["bytes"].num(), 4.0 * 1048576.0);
    let r = echo_client(&env, Host::P2, false, &addr, &bulk);
    assert_eq!(r["bytes"].num(), 4.0 * 1048576.0);

    // The point of it all: without GCB the server cannot be reached from outside, neither
    // at its private address nor at its gateway's public address.
    for target in ["10.1.0.11:7000", "203.0.113.1:7000"] {
        let mut cmd = env.plain(Host::P2, "gcb-echo-client");
        cmd.args([target, "--count", "1", "--connect-timeout", "2"]);
        let out = env.run(cmd, T);
        let stdout = text(&out.stdout);
        assert!(
            !out.status.success() && stdout.contains("\"ok\":false"),
            "p2 reached the private server at {target} without GCB: {out:?}"
        );
        println!("p2 -> {target} without GCB fails as it should: {stdout}");
    }
    // Nor is a plain (no shim) server in a1: it advertises the wildcard address.
    let cmd = {
        let mut c = env.plain(Host::A1, "gcb-echo-server");
        c.args(["--bind", "0.0.0.0:7001"]);
        c
    };
    let line = env.start(cmd, "plain-echo-server");
    assert_eq!(line, "listening on 0.0.0.0:7001");
    env.lab.wait_for_tcp_listen(Host::A1, 7001, T).unwrap();
    for target in ["10.1.0.11:7001", "203.0.113.1:7001"] {
        let mut cmd = env.plain(Host::P2, "gcb-echo-client");
        cmd.args([target, "--count", "1", "--connect-timeout", "2"]);
        let out = env.run(cmd, T);
        assert!(!out.status.success(), "p2 reached {target}: {out:?}");
        println!("p2 -> {target} (plain server) fails: {}", text(&out.stdout));
    }
    // ... while a2, on the same LAN, reaches it directly (the lab is not just broken).
    let r = echo_client(&env, Host::A2, false, "10.1.0.11:7001", &["--count", "2"]);
    assert_eq!(r["echoes"].num(), 2.0);

    // After all that, the GCB server still serves.
    let r = echo_client(&env, Host::P2, false, &addr, &["--count", "3"]);
    assert_eq!(r["echoes"].num(), 3.0);
    env.assert_alive();
}

// ---------------------------------------------------------------------------------------
// mini grid pool

const COLLECTOR: &str = "203.0.113.10:9618";

fn start_worker(env: &mut Env, host: Host, name: &str, shim: bool) -> String {
    start_worker_at(env, host, name, shim, COLLECTOR)
}

/// A worker of the collector at `collector`; returns the address it advertised.
fn start_worker_at(env: &mut Env, host: Host, name: &str, shim: bool, collector: &str) -> String {
    let tag = format!("worker-{name}");
    let mut cmd = if shim {
        env.gcb(host, "gcb-pool-worker", &tag)
    } else {
        env.plain(host, "gcb-pool-worker")
    };
    cmd.args(["--collector", collector, "--name", name, "--interval", "2"])
        .args(["--status-interval", "2"]);
    let line = env.start(cmd, &tag);
    let prefix = format!("advertising {name} ");
    line.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("worker {name} printed {line:?}"))
        .to_owned()
}

/// The scheduler command; `wait` and `timeout` are its `--wait` and `--timeout` (seconds).
fn scheduler_cmd(
    env: &Env,
    (from, shim): (Host, bool),
    workers: usize,
    (wait, timeout): (u32, u32),
    tag: &str,
) -> Command {
    let mut cmd = if shim {
        env.gcb(from, "gcb-pool-scheduler", tag)
    } else {
        env.plain(from, "gcb-pool-scheduler")
    };
    cmd.arg("--collector")
        .arg(env.collector.as_deref().unwrap_or(COLLECTOR))
        .args(["--size", "100000"])
        .arg("--wait")
        .arg(wait.to_string())
        .arg("--timeout")
        .arg(timeout.to_string())
        .arg("--jobs")
        .arg(JOBS.to_string())
        .arg("--min-workers")
        .arg(workers.to_string());
    cmd
}

const JOBS: u32 = 5;

/// Runs the scheduler in `from` and checks that every job ran, on exactly the workers
/// (and addresses) in `ads`.
fn scheduler(env: &Env, from: Host, shim: bool, ads: &BTreeMap<&str, String>) {
    let tag = format!("scheduler-{from}{}", if shim { "-gcb" } else { "" });
    let cmd = scheduler_cmd(env, (from, shim), ads.len(), (20, 30), &tag);
    let out = env.run(cmd, CLIENT_T);
    check_schedule(&tag, &out, ads);
}

fn check_schedule(tag: &str, out: &Output, ads: &BTreeMap<&str, String>) {
    let jobs = JOBS;
    let r = json_result(tag, out);
    let workers = r["workers"].arr();
    let seen: BTreeMap<&str, &str> = workers
        .iter()
        .map(|w| (w["name"].str(), w["addr"].str()))
        .collect();
    let want: BTreeMap<&str, &str> = ads.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(seen, want, "{tag}: the collector's ads");
    for w in workers {
        assert_eq!(w["jobs_ok"].num(), f64::from(jobs), "{tag}: {w:?}");
        assert_eq!(w["jobs_failed"].num(), 0.0, "{tag}: {w:?}");
    }
    assert_eq!(r["jobs_failed"].num(), 0.0, "{tag}");
    assert_eq!(
        r["jobs_ok"].num(),
        f64::from(jobs) * ads.len() as f64,
        "{tag}"
    );
}

#[test]
fn mini_pool_runs_jobs_on_private_workers_through_the_broker() {
    let mut env = Env::up();
    env.start_broker();

    // The collector is public (on the broker's host, as HTCondor runs CCB in the
    // collector); it needs no shim.
    let cmd = {
        let mut c = env.plain(Host::P1, "gcb-pool-collector");
        c.args(["--bind", COLLECTOR]);
        c
    };
    let line = env.start(cmd, "collector");
    assert_eq!(line, format!("listening on {COLLECTOR}"));

    let mut ads = BTreeMap::new();
    ads.insert("w-a1", start_worker(&mut env, Host::A1, "w-a1", true));
    ads.insert("w-b1", start_worker(&mut env, Host::B1, "w-b1", true));
    ads.insert("w-p2", start_worker(&mut env, Host::P2, "w-p2", false));

    // Private workers advertise the broker's proxy, not their private address; the plain
    // public worker advertises its own address.
    for name in ["w-a1", "w-b1"] {
        let ad = &ads[name];
        assert!(
            ad.starts_with(&format!("{BROKER}:")) && *ad != format!("{BROKER}:{BROKER_PORT}"),
            "{name} advertised {ad}, not a proxy address on the broker"
        );
    }
    assert!(
        ads["w-p2"].starts_with("203.0.113.11:"),
        "w-p2 advertised {}",
        ads["w-p2"]
    );

    // A public plain scheduler, and GCB schedulers in both private networks.
    scheduler(&env, Host::P2, false, &ads);
    scheduler(&env, Host::A2, true, &ads);
    scheduler(&env, Host::B1, true, &ads);
    env.assert_alive();
}

#[test]
fn mini_pool_survives_a_broker_restart() {
    let mut env = Env::up();
    env.start_broker();
    let cmd = {
        let mut c = env.plain(Host::P1, "gcb-pool-collector");
        c.args(["--bind", COLLECTOR]);
        c
    };
    env.start(cmd, "collector");
    let mut ads = BTreeMap::new();
    ads.insert("w-a1", start_worker(&mut env, Host::A1, "w-a1", true));
    ads.insert("w-b1", start_worker(&mut env, Host::B1, "w-b1", true));
    scheduler(&env, Host::P2, false, &ads);

    // Restart the broker (paper 4.2.2): the workers' shims re-register on their next
    // heartbeat and ask for their previous proxy port, so the ads stay valid and the
    // unmodified workers never notice.
    env.start_broker();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    let out = loop {
        attempts += 1;
        let cmd = scheduler_cmd(&env, (Host::P2, false), ads.len(), (1, 5), "scheduler-p2");
        let out = env.run(cmd, CLIENT_T);
        if out.status.success() || std::time::Instant::now() >= deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("pool usable again after the broker restart, attempt {attempts}");
    check_schedule("scheduler-p2 after broker restart", &out, &ads);
    scheduler(&env, Host::A2, true, &ads);
    env.assert_alive();
}

// ---------------------------------------------------------------------------------------
// mini grid pool: UDP status updates (issue 5)

/// The collector's `STATUS?` answer, asked from p2 without the shim: name -> (jobs done,
/// the sender address the collector's recvfrom() saw).
fn status_query(env: &Env, collector: &str) -> BTreeMap<String, (u64, String)> {
    let (ip, port) = collector.split_once(':').expect("IP:PORT");
    let out = env.lab.sh(
        Host::P2,
        &format!("printf 'STATUS?\\n' | ncat -w 5 {ip} {port}"),
        T,
    );
    assert!(out.status.success(), "STATUS? to {collector}: {out:?}");
    text(&out.stdout)
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(w.len(), 4, "bad STATUS? line {l:?}");
            (
                w[0].to_owned(),
                (w[1].parse().expect("jobs"), w[2].to_owned()),
            )
        })
        .collect()
}

/// Waits until the collector records `JOBS` jobs done by every worker in `want` (name ->
/// the public IP its status comes from), and checks the workers saw the ACKs.
fn check_status(env: &Env, collector: &str, want: &[(&str, &str)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = status_query(env, collector);
        let done = want
            .iter()
            .all(|(n, _)| st.get(*n).is_some_and(|(j, _)| *j == u64::from(JOBS)));
        if done || std::time::Instant::now() >= deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("collector {collector} status: {st:?}");
    for (name, ip) in want {
        let (jobs, from) = st
            .get(*name)
            .unwrap_or_else(|| panic!("no UDP status from {name} at {collector}: {st:?}"));
        assert_eq!(*jobs, u64::from(JOBS), "{name}: {st:?}");
        assert!(
            from.starts_with(&format!("{ip}:")),
            "{name}'s status came from {from}, not {ip}: {st:?}"
        );
        let log = read_log(&env.log(&format!("worker-{name}.err")));
        assert!(
            log.contains("acknowledged status") && !log.contains("no ACK"),
            "{name} did not get its ACKs:\n{log}"
        );
    }
    assert_eq!(st.len(), want.len(), "unexpected workers: {st:?}");
}

#[test]
fn mini_pool_workers_send_udp_status_to_a_public_collector() {
    let mut env = Env::up();
    env.start_broker();
    let cmd = {
        let mut c = env.plain(Host::P1, "gcb-pool-collector");
        c.args(["--bind", COLLECTOR]);
        c
    };
    env.start(cmd, "collector");
    let mut ads = BTreeMap::new();
    ads.insert("w-a1", start_worker(&mut env, Host::A1, "w-a1", true));
    ads.insert("w-b1", start_worker(&mut env, Host::B1, "w-b1", true));
    scheduler(&env, Host::P2, false, &ads);
    // a1 -> p1 and b1 -> p1: the private workers' datagrams go straight out through their
    // NATs, and the ACKs come back the same way.
    check_status(
        &env,
        COLLECTOR,
        &[("w-a1", "203.0.113.1"), ("w-b1", "203.0.113.2")],
    );
    env.assert_alive();
}

#[test]
fn mini_pool_udp_status_reaches_a_private_collector_under_gcb() {
    let mut env = Env::up();
    env.start_broker();
    let cmd = {
        let mut c = env.gcb(Host::A1, "gcb-pool-collector", "collector");
        c.args(["--bind", "0.0.0.0:9618"]);
        c
    };
    let line = env.start(cmd, "collector");
    let collector = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("collector printed {line:?}"))
        .to_owned();
    assert!(
        collector.starts_with(&format!("{BROKER}:")),
        "the collector in a1 must advertise a proxy, got {collector}"
    );
    // Its UDP socket on the same local port got the same proxy address.
    let err = env.log("collector.err");
    let deadline = std::time::Instant::now() + T;
    while !read_log(&err).contains("udp status on") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        read_log(&err).contains(&format!("udp status on {collector}")),
        "the UDP status socket is not at {collector}:\n{}",
        read_log(&err)
    );
    env.collector = Some(collector.clone());
    let mut ads = BTreeMap::new();
    ads.insert(
        "w-p2",
        start_worker_at(&mut env, Host::P2, "w-p2", false, &collector),
    );
    ads.insert(
        "w-b1",
        start_worker_at(&mut env, Host::B1, "w-b1", true, &collector),
    );
    scheduler(&env, Host::P2, false, &ads);
    // p2 (plain) and b1 (GCB) send to the collector's proxy; the broker relays, the
    // collector sees the original senders and its ACKs go back through the proxy.
    check_status(
        &env,
        &collector,
        &[("w-p2", "203.0.113.11"), ("w-b1", "203.0.113.2")],
    );
    env.assert_alive();
}
