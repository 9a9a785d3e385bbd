//! A broker restart and the listeners' standby connections (issue #16's restart storm, seen
//! from the shim): a restarted broker no longer knows a standby key until the listener
//! registers again, so it refuses (closes) every standby dialed before that. The shim must
//! not keep dialing into those refusals on its short back-off (it used to: about four
//! refused dials per listener per restart with a 2 s heartbeat, 45,000 for 10,000
//! listeners in the scale bench); after one refusal it waits a heartbeat interval, and the
//! re-registration brings a fresh standby at once.
//!
//! Needs root and the lab. Run the compiled test binary with `CARGO_TARGET_DIR` pointing at
//! an older tree's target directory to see the old shim fail it.

use std::time::Duration;

use gcb_lab::{
    brokerd, gcb_run, libgcb, python, read_text as read, wait_line, Broker, Host, Lab, Scratch,
};

const P1: &str = "203.0.113.10";
const LISTENERS: usize = 40;

const SERVER: &str = r#"
import select, socket, sys
n, base = int(sys.argv[1]), int(sys.argv[2])
ls = []
for i in range(n):
    s = socket.socket()
    s.bind(("0.0.0.0", base + i))
    s.listen(8)
    ls.append(s)
print("READY", flush=True)
while True:
    r, _, _ = select.select(ls, [], [], 1.0)
    for s in r:
        c, _ = s.accept()
        c.close()
"#;

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
#[ignore = "needs root and the network lab"]
fn a_restarted_broker_gets_at_most_one_refused_standby_per_listener() {
    brokerd();
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("sbrestart", &lab);
    let args = ["--log", "debug"];
    let log1 = dir.join("broker1.err");
    let mut broker = Broker::start(&lab, Host::P1, P1, true, &args, &log1);
    let mut cmd = gcb_run(&lab, Host::A1, true, &["--broker", P1], None);
    cmd.env("GCB_HEARTBEAT_MS", "2000");
    cmd.args([python(), "-u", "-c", SERVER, &LISTENERS.to_string(), "9100"]);
    let server = lab.spawn_logged(&mut cmd, &dir, "server");
    assert!(
        wait_line(&server.out, Duration::from_secs(10), |l| l == "READY").is_some(),
        "server: {}",
        read(&server.err)
    );
    let parked = |log: &std::path::Path| count(&read(log), "parked for proxy");
    assert!(
        wait_line(&log1, Duration::from_secs(10), |_| parked(&log1)
            >= LISTENERS)
        .is_some(),
        "{LISTENERS} standbys parked at the first broker: {}",
        read(&log1)
    );

    // kill -9 and a new broker on the same address at once.
    broker.proc.signal_group(libc::SIGKILL);
    let _ = broker.proc.wait_timeout(Duration::from_secs(5));
    let log2 = dir.join("broker2.err");
    let broker2 = Broker::start(&lab, Host::P1, P1, true, &args, &log2);
    assert!(
        wait_line(&log2, Duration::from_secs(20), |_| {
            count(&read(&log2), "registered tcp") >= LISTENERS && parked(&log2) >= LISTENERS
        })
        .is_some(),
        "every listener registered again with a standby parked: {}",
        broker2.text()
    );
    // Let the back-off run a few more heartbeats, then count the refusals.
    std::thread::sleep(Duration::from_secs(3));
    let text = broker2.text();
    let refused = text
        .lines()
        .filter(|l| l.contains("standby from") && l.contains(" refused"))
        .count();
    assert!(
        refused <= LISTENERS,
        "{refused} standby dials refused by the restarted broker for {LISTENERS} listeners \
         (at most one each):\n{}",
        text.lines()
            .filter(|l| l.contains(" refused"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
