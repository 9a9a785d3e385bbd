//! TCP hole punching (issue #15): a forged or replayed punch is refused.
//!
//! A listener in a1 under `gcb-run` records every connection its program accepts (peer and
//! first bytes). A pool member in b1 plays the connector's side of a punch by hand
//! (`programs/secpunch_tool.py`): it asks the broker for a punch, reads the offer on its
//! relay leg and connects from that port to the listener's endpoint; then:
//!
//! * `honest`: the connector writes its proof: the program gets the connection, from b1's
//!   public address, with the bytes that follow;
//! * `forged`: 16 random bytes instead of the proof: the shim closes the connection and
//!   the program never sees it;
//! * `replay:HEX`: the proof of the earlier honest punch (a captured proof replayed on a
//!   new punch): refused the same way, because every punch has its own nonce;
//! * `honest` again: a legitimate connector still gets through.
//!
//! Forged punch *claims* (the broker's message on a standby, bound by the pool key and
//! the standby's key; a nonce is taken once) are refused by
//! `gcb::tcp_punch::tests::a_claim_is_taken_once_from_the_broker_for_a_public_peer`; the
//! broker's side cannot be reached without the pool key (its keyed control plane).
//! Needs root and the lab; the gateways behave like home routers (`netlab cpe on`).

use std::time::Duration;

use gcb_lab::{
    brokerd, gcb_run, libgcb, python, read_text as read, wait_line, Broker, Host, Lab, Scratch,
};

const P1: &str = "203.0.113.10";
const GWB: &str = "203.0.113.2";
const A1: &str = "10.1.0.11";
const UP: Duration = Duration::from_secs(10);
const RECORDER: &str = include_str!("programs/secshim_recorder.py");
const TOOL: &str = include_str!("programs/secpunch_tool.py");

/// One run of the tool in b1 (keyed: a pool member): its stdout.
fn punch_by_hand(lab: &Lab, dir: &Scratch, proxy: &str, mode: &str) -> String {
    let tool = dir.join("tool.py");
    std::fs::write(&tool, TOOL).unwrap();
    let args: [&std::ffi::OsStr; 4] = [
        "-u".as_ref(),
        tool.as_os_str(),
        proxy.as_ref(),
        mode.as_ref(),
    ];
    let out = lab.run(Host::B1, python(), args, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("CONNECTED"),
        "{mode}: the punched connection did not come up: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
#[ignore = "needs root and the network lab"]
fn a_forged_or_replayed_punch_proof_is_refused() {
    brokerd();
    libgcb();
    let lab = Lab::up();
    lab.cpe(true);
    let dir = Scratch::new("secpunch", &lab);
    let blog = dir.join("broker.err");
    let broker = Broker::start(&lab, Host::P1, P1, true, &["--log", "debug"], &blog);
    let slog = dir.join("server.shim.log");
    let mut cmd = gcb_run(
        &lab,
        Host::A1,
        true,
        &["--broker", P1],
        Some(("debug", &slog)),
    );
    cmd.args([python(), "-u", "-c", RECORDER, "0.0.0.0", "8000"]);
    let server = lab.spawn_logged(&mut cmd, &dir, "server");
    assert!(
        wait_line(&server.out, UP, |l| l == "READY").is_some(),
        "recorder did not start: {}",
        read(&server.err)
    );
    let proxy = broker
        .proxy_of("tcp listener", &format!("{A1}:8000"), UP)
        .to_string();
    // The standby the punch claims: parked a moment after the registration.
    assert!(
        wait_line(&blog, UP, |l| l.contains("standby from")
            && l.contains("parked"))
        .is_some(),
        "no standby parked: {}",
        broker.text()
    );

    let conns = |n: usize| {
        wait_line(&server.out, Duration::from_secs(5), |_| {
            read(&server.out)
                .lines()
                .filter(|l| l.starts_with("CONN "))
                .count()
                >= n
        });
        read(&server.out)
            .lines()
            .filter(|l| l.starts_with("CONN "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    let honest = punch_by_hand(&lab, &dir, &proxy, "honest");
    let proof = honest
        .lines()
        .find_map(|l| l.strip_prefix("PROOF "))
        .expect("the tool prints its proof")
        .to_owned();
    let seen = conns(1);
    assert!(
        seen.len() == 1
            && seen[0].starts_with(&format!("CONN {GWB}:"))
            && seen[0].contains("HELLO-HONEST"),
        "the honest punch must reach the program from b1's public address: {seen:?}\nshim log:\n{}",
        read(&slog)
    );

    // Wait for the next standby, so the next punch has one to claim.
    let parked = || broker.text().matches("parked for proxy").count();
    let before = parked();
    let standby_again = |before: usize| {
        wait_line(&blog, UP, |_| parked() > before);
    };
    standby_again(before - 1);

    for mode in ["forged".to_owned(), format!("replay:{proof}")] {
        let before = parked();
        let out = punch_by_hand(&lab, &dir, &proxy, &mode);
        assert!(
            !out.contains("ANSWERED"),
            "{mode}: the listener's side answered: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let seen = conns(1);
        assert_eq!(
            seen.len(),
            1,
            "{mode}: the program accepted a connection whose proof was wrong: {seen:?}"
        );
        standby_again(before);
    }
    let refusals = read(&slog).matches("wrong proof").count();
    assert_eq!(
        refusals,
        2,
        "the shim must refuse both with one line each; shim log:\n{}",
        read(&slog)
    );

    punch_by_hand(&lab, &dir, &proxy, "honest");
    let seen = conns(2);
    assert!(
        seen.len() == 2 && seen[1].contains("HELLO-HONEST"),
        "a legitimate punch after the refused ones: {seen:?}"
    );
}
