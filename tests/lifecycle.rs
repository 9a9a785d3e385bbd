//! Signals and logs of the daemons in the lab (issue 13, items 5 and 6): SIGUSR1 logs the
//! stats line and changes nothing; SIGHUP reloads the pool key without dropping a relayed
//! transfer in flight, and refuses a bad key file keeping the old one; SIGTERM drains
//! (refuses new registrations and connections, lets the relayed transfer finish, then
//! exits 0 with the stats line) and the grace period cuts what outlives it; log lines
//! carry an RFC 3339 UTC timestamp, or the journald priority when `JOURNAL_STREAM` names
//! stderr.
//!
//! The transfer: `socat` in b1 (behind gwb) to the proxy of a `socat ... SYSTEM:sha256sum`
//! server in a1 (behind gwa) under gcb-run, which the broker on p1 relays. The client
//! sends half of its payload, then waits for a file the test creates (so the transfer is
//! in flight for as long as the test needs, without timing), then the rest; the server
//! answers the sha256 of what it received.
//!
//! Nothing is built here: `scripts/test-all` builds the workspace first. Needs root.

use std::fs;
use std::net::SocketAddrV4;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use gcb_lab::{
    brokerd, gcb_run, last_stats, random_bytes, read_text, sha256, wait_line, Broker, Host, Lab,
    Proc, Scratch,
};

const P1: &str = "203.0.113.10";
/// Generous bound for anything that should happen promptly.
const UP: Duration = Duration::from_secs(20);

/// A lab with a keyed broker on p1 whose key file is the test's own copy (so the test can
/// change it), and a `socat ... SYSTEM:sha256sum` server in a1 registered with it.
struct Rig {
    lab: Lab,
    dir: Scratch,
    broker: Broker,
    key: PathBuf,
    proxy: SocketAddrV4,
    _server: Proc,
}

/// A random 256-bit key, hex, as `gcb-brokerd --generate-key` writes it.
fn random_key() -> String {
    let hex: String = random_bytes(32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex + "\n"
}

impl Rig {
    fn up(tag: &str, broker_args: &[&str]) -> Rig {
        let lab = Lab::up();
        let dir = Scratch::new(tag, &lab);
        let key = dir.join("broker.key");
        fs::copy(lab.key_file(), &key).expect("copy the pool key");
        let key_s = key.to_str().expect("utf-8 path").to_owned();
        let mut args = vec!["--key-file", &key_s, "--log", "debug"];
        args.extend_from_slice(broker_args);
        let broker = Broker::start(&lab, Host::P1, P1, true, &args, &dir.join("broker.log"));
        let server = listener(&lab, &dir, Host::A1, 7000, None, "server");
        let local = format!("{}:7000", Host::A1.addr());
        let proxy = broker.proxy_of("tcp listener", &local, UP);
        Rig {
            lab,
            dir,
            broker,
            key,
            proxy,
            _server: server,
        }
    }

    /// A payload of `n` random bytes in two files (the halves) and its sha256.
    fn payload(&self, name: &str, n: usize) -> (PathBuf, PathBuf, String) {
        let data = random_bytes(n);
        let (a, b) = (
            self.dir.join(format!("{name}.1")),
            self.dir.join(format!("{name}.2")),
        );
        fs::write(&a, &data[..n / 2]).unwrap();
        fs::write(&b, &data[n / 2..]).unwrap();
        (a, b, sha256(&data))
    }

    /// The client in b1: sends the first half, waits for `go` to exist, sends the rest;
    /// its stdout is what the server answered.
    fn client(&self, first: &Path, second: &Path, go: &Path) -> Proc {
        let script = format!(
            "{{ cat {}; while [ ! -e {} ]; do sleep 0.05; done; cat {}; }} | \
             socat -t 60 -T 120 - TCP4:{}",
            first.display(),
            go.display(),
            second.display(),
            self.proxy
        );
        let mut c = self.lab.cmd(Host::B1, "sh");
        c.args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.lab.spawn(&mut c).expect("spawn client").capture()
    }

    /// Waits for the broker's log line containing `needle`; panics with the log.
    fn broker_says(&self, needle: &str) -> String {
        wait_line(&self.broker.log, UP, |l| l.contains(needle)).unwrap_or_else(|| {
            panic!(
                "no broker line with {needle:?}; broker log:\n{}",
                self.broker.text()
            )
        })
    }

    fn signal(&self, sig: i32) {
        self.broker.proc.signal_group(sig);
    }
}

/// `socat TCP4-LISTEN:PORT,fork SYSTEM:sha256sum` under gcb-run in `host`, with the lab's
/// pool key or the key file `key`; its shim log is `DIR/NAME.shim.log`.
fn listener(lab: &Lab, dir: &Path, host: Host, port: u16, key: Option<&Path>, name: &str) -> Proc {
    let log = dir.join(format!("{name}.shim.log"));
    let mut c = gcb_run(lab, host, true, &["--broker", P1], Some(("info", &log)));
    if let Some(k) = key {
        c.env("GCB_KEY_FILE", k);
    }
    c.args([
        "socat",
        &format!("TCP4-LISTEN:{port},fork,reuseaddr"),
        "SYSTEM:sha256sum",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    lab.spawn(&mut c).expect("spawn listener")
}

/// The shim log line of `name` (see [`listener`]) containing `needle`.
fn shim_says(dir: &Path, name: &str, needle: &str) -> String {
    let log = dir.join(format!("{name}.shim.log"));
    wait_line(&log, UP, |l| l.contains(needle)).unwrap_or_else(|| {
        panic!(
            "no line with {needle:?} in {}:\n{}",
            log.display(),
            read_text(&log)
        )
    })
}

fn assert_answer(out: &Output, sha: &str, what: &str) {
    assert!(out.status.success(), "{what}: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{sha}  -"),
        "{what}: the server did not receive the payload intact; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// SIGUSR1 (and SIGHUP) used to kill the broker (exit 129/138). Now SIGUSR1 logs the stats
/// line, and the broker keeps serving: a new listener registers afterwards.
#[test]
fn sigusr1_logs_the_stats_line_and_the_broker_keeps_serving() {
    let rig = Rig::up("sigusr1", &["--stats-interval-secs", "0"]);
    assert_eq!(count(&rig.broker.text(), " stats "), 0);
    rig.signal(libc::SIGUSR1);
    rig.broker_says(" stats ");
    let stats = last_stats(&rig.broker.text()).expect("a stats line");
    assert_eq!(stats.get("registrations"), Some(&1), "{stats:?}");
    let _second = listener(&rig.lab, &rig.dir, Host::A2, 7001, None, "second");
    rig.broker
        .proxy_of("tcp listener", &format!("{}:7001", Host::A2.addr()), UP);
    let mut broker = rig.broker;
    assert!(broker.proc.wait_timeout(Duration::ZERO).unwrap().is_none());
    let stats = broker.stop_and_stats();
    assert_eq!(stats.get("registrations"), Some(&2), "{stats:?}");
}

/// SIGHUP with a new key in the key file while a relayed transfer is in flight: the
/// transfer completes intact, the broker says the key changed, a listener with the new key
/// registers, and one with the old key is refused (its shim hears nothing it accepts and
/// serves locally).
#[test]
fn sighup_reloads_the_key_without_dropping_a_relay_in_flight() {
    let rig = Rig::up("sighup-key", &[]);
    let (first, second, sha) = rig.payload("payload", 4 << 20);
    let go = rig.dir.join("go");
    let client = rig.client(&first, &second, &go);
    rig.broker_says("relay started:");

    let new_key = rig.dir.join("new.key");
    fs::write(&new_key, random_key()).unwrap();
    fs::copy(&new_key, &rig.key).unwrap();
    rig.signal(libc::SIGHUP);
    let line = rig.broker_says("reloaded:");
    assert!(line.contains("pool key changed"), "{line}");

    fs::write(&go, b"").unwrap();
    assert_answer(
        &client.finish(UP),
        &sha,
        "relayed transfer across the reload",
    );
    let text = rig.broker.text();
    assert_eq!(count(&text, "relay reset:"), 0, "{text}");
    assert_eq!(count(&text, "relay closed:"), 1, "{text}");

    let _new = listener(&rig.lab, &rig.dir, Host::A2, 7001, Some(&new_key), "new");
    rig.broker
        .proxy_of("tcp listener", &format!("{}:7001", Host::A2.addr()), UP);
    let _old = listener(&rig.lab, &rig.dir, Host::A2, 7002, None, "old");
    shim_says(&rig.dir, "old", "serving locally only");
    assert!(
        !rig.broker
            .text()
            .contains(&format!("local {}:7002 ", Host::A2.addr())),
        "a listener with the old key registered after the reload:\n{}",
        rig.broker.text()
    );
}

/// SIGHUP with a key file that is not a key: one error line, the old key stays (a
/// listener with it still registers), nothing is dropped.
#[test]
fn sighup_with_a_bad_key_file_keeps_the_running_configuration() {
    let rig = Rig::up("sighup-bad", &[]);
    fs::write(&rig.key, b"short\n").unwrap();
    rig.signal(libc::SIGHUP);
    let line = rig.broker_says("reload refused");
    assert!(
        line.contains("ERROR") && line.contains("key file") && line.contains("bytes"),
        "{line}"
    );
    assert_eq!(count(&rig.broker.text(), "reloaded:"), 0);
    let _second = listener(&rig.lab, &rig.dir, Host::A2, 7001, None, "second");
    rig.broker
        .proxy_of("tcp listener", &format!("{}:7001", Host::A2.addr()), UP);
    // The first registration is still served: a plain transfer through its proxy works.
    let (first, second, sha) = rig.payload("after", 256 << 10);
    let go = rig.dir.join("go");
    fs::write(&go, b"").unwrap();
    assert_answer(&rig.client(&first, &second, &go).finish(UP), &sha, "after");
}

/// SIGTERM with a relayed transfer in flight: the broker closes its proxies (a new
/// connection is refused) and refuses a new registration, lets the transfer finish
/// intact, then exits 0 with the stats line.
#[test]
fn sigterm_drains_a_relayed_transfer_then_exits_with_the_stats_line() {
    let mut rig = Rig::up("sigterm-drain", &[]);
    let (first, second, sha) = rig.payload("payload", 4 << 20);
    let go = rig.dir.join("go");
    let client = rig.client(&first, &second, &go);
    rig.broker_says("relay started:");

    rig.signal(libc::SIGTERM);
    rig.broker_says("draining:");
    let _late = listener(&rig.lab, &rig.dir, Host::A2, 7001, None, "late");
    let refused = shim_says(&rig.dir, "late", "serving locally only");
    assert!(refused.contains("shutting down"), "{refused}");
    assert!(
        !rig.lab
            .tcp_connects(Host::P2, rig.proxy.ip(), rig.proxy.port()),
        "the proxy still accepts connections while draining"
    );
    assert!(rig
        .broker
        .proc
        .wait_timeout(Duration::ZERO)
        .unwrap()
        .is_none());

    fs::write(&go, b"").unwrap();
    assert_answer(
        &client.finish(UP),
        &sha,
        "relayed transfer during the drain",
    );
    let status = rig.broker.proc.wait_timeout(UP).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "broker exit {status:?}:\n{}",
        rig.broker.text()
    );
    let text = rig.broker.text();
    let drained = text.find("drained: no relay left").expect("drained line");
    let stats = text.rfind(" stats ").expect("stats line");
    assert!(stats > drained, "{text}");
    let stats = last_stats(&text).unwrap();
    assert_eq!(stats.get("relays_done"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("relays_reset"), Some(&0), "{stats:?}");
}

/// A transfer that outlives `--drain-grace-secs` is reset (the receiver does not get a
/// clean end it could take for a complete transfer) and the broker exits 0.
#[test]
fn drain_grace_period_cuts_a_transfer_that_outlives_it() {
    let mut rig = Rig::up("sigterm-grace", &["--drain-grace-secs", "2"]);
    let (first, second, sha) = rig.payload("payload", 4 << 20);
    let go = rig.dir.join("go");
    let client = rig.client(&first, &second, &go);
    rig.broker_says("relay started:");
    rig.signal(libc::SIGTERM);
    let status = rig.broker.proc.wait_timeout(UP).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "broker exit {status:?}:\n{}",
        rig.broker.text()
    );
    let text = rig.broker.text();
    assert!(
        text.contains("drain grace period (2 s) over: resetting 1 relays"),
        "{text}"
    );
    assert_eq!(last_stats(&text).unwrap().get("relays_reset"), Some(&1));
    fs::write(&go, b"").unwrap();
    let out = client.finish(UP);
    assert_ne!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{sha}  -"),
        "a cut transfer cannot have arrived whole"
    );
}

/// Every broker log line starts with an RFC 3339 UTC timestamp with milliseconds.
fn assert_timestamped(text: &str) {
    for l in text.lines() {
        let b = l.as_bytes();
        let ok = b.len() > 25
            && l.is_char_boundary(24)
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'.'
            && b[23] == b'Z'
            && b[24] == b' '
            && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19, 20..23]
                .iter()
                .all(|r| b[r.clone()].iter().all(u8::is_ascii_digit));
        assert!(ok, "not `YYYY-MM-DDTHH:MM:SS.mmmZ gcb-brokerd: ...`: {l:?}");
        assert!(l[25..].starts_with("gcb-brokerd: "), "{l:?}");
    }
}

/// Log lines: timestamps on a plain stderr; under systemd (`JOURNAL_STREAM` naming the
/// file stderr is) the sd-daemon priority instead; `JOURNAL_STREAM` naming another file
/// (a child whose stderr was redirected) keeps the timestamps.
#[test]
fn log_lines_carry_timestamps_or_journal_priorities() {
    let lab = Lab::up();
    let dir = Scratch::new("loglines", &lab);
    let run = |name: &str, journal: Option<&str>| -> String {
        let log = dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).unwrap();
        let md = fs::metadata(&log).unwrap();
        let mut c = lab.cmd(Host::P1, brokerd());
        c.args([
            "--listen",
            P1,
            "--log",
            "trace",
            "--stats-interval-secs",
            "0",
        ])
        .arg("--admin-socket")
        .arg(dir.join(format!("{name}.sock")))
        .stdout(Stdio::null())
        .stderr(file);
        match journal {
            Some("self") => c.env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino())),
            Some(other) => c.env("JOURNAL_STREAM", other),
            None => c.env_remove("JOURNAL_STREAM"),
        };
        let mut p = lab.spawn(&mut c).expect("spawn broker");
        wait_line(&log, UP, |l| l.contains("listening on udp"))
            .unwrap_or_else(|| panic!("broker did not start:\n{}", read_text(&log)));
        p.signal_group(libc::SIGTERM);
        let st = p.wait_timeout(UP).unwrap();
        assert!(
            st.is_some_and(|s| s.success()),
            "{st:?}: {}",
            read_text(&log)
        );
        read_text(&log)
    };
    let plain = run("plain", None);
    assert!(count(&plain, " stats ") == 1, "{plain}");
    assert_timestamped(&plain);
    let elsewhere = run("elsewhere", Some("1:1"));
    assert_timestamped(&elsewhere);
    let journal = run("journal", Some("self"));
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<6>gcb-brokerd: INFO listening on udp ")),
        "{journal}"
    );
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<6>gcb-brokerd: INFO stats ")),
        "{journal}"
    );
    for l in journal.lines() {
        let prio = ["<3>", "<4>", "<6>", "<7>"]
            .iter()
            .find(|p| l.starts_with(*p))
            .unwrap_or_else(|| panic!("no priority: {l:?}"));
        let level = l[3..]
            .strip_prefix("gcb-brokerd: ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("{l:?}"));
        let want = match level {
            "ERROR" => "<3>",
            "WARN" => "<4>",
            "INFO" => "<6>",
            _ => "<7>",
        };
        assert_eq!(*prio, want, "{l:?}");
    }
}

/// One `gcb-dpf-request --server 10.1.0.1 query 203.0.113.1:20000` from a1 with the key
/// file `key`: whether portfwd answered it.
fn portfwd_answers(lab: &Lab, key: &Path) -> bool {
    let mut c = lab.cmd(Host::A1, gcb_lab::release_artifact("gcb-dpf-request"));
    c.args(["--server", "10.1.0.1", "query", "203.0.113.1:20000"])
        .env("GCB_KEY_FILE", key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = lab.spawn(&mut c).expect("spawn gcb-dpf-request").capture();
    out.finish(Duration::from_secs(60)).status.success()
}

/// gcb-portfwd: SIGUSR1 logs the stats line and changes nothing; SIGHUP re-reads the key
/// file (requests sealed with the old key are refused after it, with the new one
/// answered); SIGTERM exits 0 with the stats line, keeping the mappings.
#[test]
fn portfwd_signals() {
    let lab = Lab::up();
    let dir = Scratch::new("portfwd-signals", &lab);
    let key = dir.join("portfwd.key");
    fs::copy(lab.key_file(), &key).unwrap();
    let key_s = key.to_str().unwrap().to_owned();
    let mut pf = gcb_lab::Portfwd::start(
        &lab,
        &dir,
        &[
            "--private",
            "10.1.0.0/24",
            "--ports",
            "20000-20099",
            "--key-file",
            &key_s,
            "--stats-interval-secs",
            "0",
        ],
    );
    assert!(portfwd_answers(&lab, lab.key_file()));
    pf.proc.signal_group(libc::SIGUSR1);
    wait_line(&pf.log, UP, |l| l.contains(" stats "))
        .unwrap_or_else(|| panic!("no stats line:\n{}", pf.text()));
    assert!(pf.proc.wait_timeout(Duration::ZERO).unwrap().is_none());

    let new_key = dir.join("new.key");
    fs::write(&new_key, random_key()).unwrap();
    fs::copy(&new_key, &key).unwrap();
    pf.proc.signal_group(libc::SIGHUP);
    let line = wait_line(&pf.log, UP, |l| l.contains("reloaded:"))
        .unwrap_or_else(|| panic!("no reload line:\n{}", pf.text()));
    assert!(line.contains("pool key changed"), "{line}");
    assert!(portfwd_answers(&lab, &new_key), "{}", pf.text());
    assert!(!portfwd_answers(&lab, lab.key_file()), "{}", pf.text());

    let stats = pf.stop_and_stats();
    assert!(stats.contains_key("requests"), "{stats:?}");
    assert!(pf.text().contains("mappings kept"), "{}", pf.text());
}
