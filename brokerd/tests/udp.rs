//! End-to-end tests of the UDP relay (paper 4.2.2) with the real
//! `gcb-brokerd` binary on loopback: a test "listener" registers a UDP
//! socket over the control protocol, sends Dummy frames from its data
//! socket, and exchanges From/To frames with plain UDP senders.

mod common;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use gcb_proto::udp::{self, UdpKind, MAX_UDP_PAYLOAD};
use gcb_proto::{token, Body, Transport};

const QUIET: Duration = Duration::from_millis(300);

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4(s: SocketAddr) -> SocketAddrV4 {
    match s {
        SocketAddr::V4(x) => x,
        SocketAddr::V6(_) => panic!("not v4: {s}"),
    }
}

/// Registration tokens by proxy, as the broker handed them out (an unkeyed broker).
static TOKENS: std::sync::Mutex<Vec<(SocketAddr, Transport, [u8; 16])>> =
    std::sync::Mutex::new(Vec::new());

/// The ownership proof of the `transport` registration at `proxy` (gcb_proto::token).
fn proof_of(transport: Transport, proxy: SocketAddr) -> Option<String> {
    let tokens = TOKENS.lock().unwrap();
    let (_, _, t) = tokens
        .iter()
        .rev()
        .find(|(p, tr, _)| *p == proxy && *tr == transport)?;
    Some(token::present_hex(
        Some(&test_key()),
        token::Use::Ownership,
        t,
    ))
}

fn proof(proxy: SocketAddr) -> Option<String> {
    proof_of(Transport::Udp, proxy)
}

fn remember(proxy: SocketAddr, transport: Transport, tok: &str) -> [u8; 16] {
    let t = token::from_hex(tok).unwrap_or_else(|| panic!("token {tok:?}"));
    TOKENS.lock().unwrap().push((proxy, transport, t));
    t
}

/// Registers a UDP socket (with the ownership proof of `prev`, if any); returns the
/// proxy and the Dummy token the shim would send (the registration token presented for
/// Dummy frames).
fn register_udp(
    c: &mut Client,
    local: SocketAddr,
    prev: Option<SocketAddr>,
) -> (SocketAddr, String) {
    match c.request(Body::Register {
        transport: Transport::Udp,
        local,
        previous_proxy: prev,
        previous_token: prev.and_then(proof),
        punch: false,
    }) {
        Some(Body::Registered {
            proxy,
            lease_ms,
            token: Some(tok),
        }) => {
            assert!(lease_ms > 0);
            let t = remember(proxy, Transport::Udp, &tok);
            let dummy = token::present_hex(Some(&test_key()), token::Use::UdpDummy, &t);
            assert!(udp::is_token(dummy.as_bytes()));
            (proxy, dummy)
        }
        other => panic!("register udp: {other:?}"),
    }
}

fn sock(bind: &str) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn frame(kind: UdpKind, addr: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut v = udp::write_header(kind, addr).to_vec();
    v.extend_from_slice(payload);
    v
}

/// Receives one datagram within `timeout`: (bytes, source).
fn recv(s: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 70_000];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            buf.truncate(n);
            Some((buf, from))
        }
        Err(_) => None,
    }
}

/// Nothing arrives at `s` for a while.
fn silent(s: &UdpSocket, what: &str) {
    if let Some((b, from)) = recv(s, QUIET) {
        panic!("{what}: unexpected {}-byte datagram from {from}", b.len());
    }
}

/// Sends Dummy from `data` and waits for the DummyAck; returns the address
/// the broker observed.
fn dummy(data: &UdpSocket, proxy: SocketAddr, token: &str) -> SocketAddrV4 {
    let d = frame(UdpKind::Dummy, v4(a("0.0.0.0:0")), token.as_bytes());
    for _ in 0..10 {
        data.send_to(&d, proxy).unwrap();
        if let Some((b, from)) = recv(data, Duration::from_millis(500)) {
            assert_eq!(from, proxy, "DummyAck comes from the proxy");
            let (kind, addr, payload) = udp::parse(&b).expect("a frame");
            assert_eq!(kind, UdpKind::DummyAck);
            assert_eq!(payload, token.as_bytes());
            return addr;
        }
    }
    panic!("no DummyAck from {proxy}");
}

/// The listener receives a From frame: (sender, payload).
fn recv_from_frame(data: &UdpSocket, proxy: SocketAddr) -> (SocketAddr, Vec<u8>) {
    let (b, from) = recv(data, Duration::from_secs(5)).expect("no From frame");
    assert_eq!(from, proxy);
    let (kind, sender, payload) = udp::parse(&b).expect("a frame");
    assert_eq!(kind, UdpKind::From);
    (SocketAddr::V4(sender), payload.to_vec())
}

/// One request/response through the proxy; checks both directions.
fn round_trip(sender: &UdpSocket, data: &UdpSocket, proxy: SocketAddr, req: &[u8], resp: &[u8]) {
    sender.send_to(req, proxy).unwrap();
    let (who, got) = recv_from_frame(data, proxy);
    assert_eq!(who, sender.local_addr().unwrap(), "logical sender");
    assert_eq!(got.len(), req.len());
    assert_eq!(sha256(&got), sha256(req), "sender -> listener corrupted");
    data.send_to(&frame(UdpKind::To, v4(who), resp), proxy)
        .unwrap();
    let (back, from) = recv(sender, Duration::from_secs(5)).expect("no reply");
    assert_eq!(
        from, proxy,
        "the reply comes from the address the sender used"
    );
    assert_eq!(back.len(), resp.len());
    assert_eq!(sha256(&back), sha256(resp), "listener -> sender corrupted");
}

#[test]
fn udp_relay_both_ways_and_bad_input() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    let mut ctl = Client::new(broker.addr);
    let local = a("10.1.0.5:9618");
    let (proxy, token) = register_udp(&mut ctl, local, None);
    assert_eq!(proxy.ip(), broker.addr.ip());
    assert_ne!(proxy.port(), broker.addr.port());
    // Idempotent: same proxy, same token.
    assert_eq!(register_udp(&mut ctl, local, None), (proxy, token.clone()));
    // A TCP listener on the same local address is a separate registration
    // with its own proxy and its own token (a standby key, not the UDP token).
    match ctl.request(Body::Register {
        transport: Transport::Tcp,
        local,
        previous_proxy: None,
        previous_token: None,
        punch: false,
    }) {
        Some(Body::Registered {
            proxy: p,
            token: tcp_token,
            ..
        }) => {
            assert_ne!(p, proxy);
            let (token, udp_token) = (tcp_token, token.clone());
            assert!(token.as_ref().is_some_and(|t| *t != udp_token), "{token:?}");
        }
        other => panic!("{other:?}"),
    }

    let data = sock("127.0.0.1:0");
    let sender = sock("127.0.0.1:0");
    let sender2 = sock("127.0.0.2:0");

    // Before the listener's Dummy there is nowhere to relay to.
    sender.send_to(b"too early", proxy).unwrap();
    silent(&sender, "no listener yet");

    let observed = dummy(&data, proxy, &token);
    assert_eq!(SocketAddr::V4(observed), data.local_addr().unwrap());
    broker.wait_log("listener data address", Duration::from_secs(2));

    // 100 datagrams of random content and varying sizes, each answered.
    let mut bytes = 0usize;
    for i in 0..100u64 {
        let len = match i {
            0 => 0,
            1 => 1,
            2 => MAX_UDP_PAYLOAD,
            3 => 1472,
            _ => ((i * 7919) % 9000) as usize,
        };
        let req = random_data(len, 1000 + i);
        let resp = random_data((len * 3 + 17) % 9001, 5000 + i);
        let s = if i % 3 == 0 { &sender2 } else { &sender };
        round_trip(s, &data, proxy, &req, &resp);
        bytes += len;
    }

    // Too big to wrap: dropped.
    sender
        .send_to(&vec![7u8; MAX_UDP_PAYLOAD + 1], proxy)
        .unwrap();
    silent(&data, "too big");

    // The listener may not send to an address that never sent to it.
    let stranger = sock("127.0.0.3:0");
    data.send_to(
        &frame(UdpKind::To, v4(stranger.local_addr().unwrap()), b"spam"),
        proxy,
    )
    .unwrap();
    silent(&stranger, "no rule");

    // Wrong tokens: no ack, data address unchanged.
    let intruder = sock("127.0.0.4:0");
    let bad = frame(
        UdpKind::Dummy,
        v4(a("0.0.0.0:0")),
        b"00000000000000000000000000000000",
    );
    intruder.send_to(&bad, proxy).unwrap();
    intruder
        .send_to(&frame(UdpKind::Dummy, v4(a("0.0.0.0:0")), b""), proxy)
        .unwrap();
    data.send_to(&bad, proxy).unwrap();
    silent(&intruder, "wrong token");
    silent(&data, "wrong token from the data address");

    // Frames only the broker sends, or To from a non-listener: dropped.
    sender
        .send_to(
            &frame(UdpKind::To, v4(stranger.local_addr().unwrap()), b"x"),
            proxy,
        )
        .unwrap();
    sender
        .send_to(&frame(UdpKind::From, observed, b"x"), proxy)
        .unwrap();
    silent(&stranger, "stray To");
    silent(&data, "stray frames are not relayed");
    // A plain datagram from the listener's data address is not a frame.
    data.send_to(b"not a frame", proxy).unwrap();
    silent(&sender, "not a frame");

    // Still working after all that.
    round_trip(&sender, &data, proxy, b"still there?", b"yes");

    // NAT remapping: a Dummy with the token from a new address moves the
    // data address.
    let data2 = sock("127.0.0.1:0");
    assert_eq!(
        SocketAddr::V4(dummy(&data2, proxy, &token)),
        data2.local_addr().unwrap()
    );
    round_trip(&sender, &data2, proxy, b"after remap", b"ok");
    silent(&data, "old data address");
    // The old address can no longer send for the listener (a To frame from
    // anyone but the listener is stray).
    data.send_to(
        &frame(UdpKind::To, v4(sender.local_addr().unwrap()), b"old"),
        proxy,
    )
    .unwrap();
    silent(&sender, "To from the old data address");

    // Unregister closes the proxy socket.
    match ctl.request(Body::Unregister {
        proxy,
        transport: Some(Transport::Udp),
        token: None,
    }) {
        Some(Body::Error { code, .. }) => assert_eq!(code, gcb_proto::ErrorCode::NotOwner),
        other => panic!("unregister without the proof: {other:?}"),
    }
    match ctl.request(Body::Unregister {
        proxy,
        transport: Some(Transport::Udp),
        token: proof(proxy),
    }) {
        Some(Body::Ack {}) => {}
        other => panic!("{other:?}"),
    }
    sender.send_to(b"gone", proxy).unwrap();
    silent(&data2, "unregistered");

    let log = broker.stop();
    let s = |n| stat(&log, n);
    assert_eq!(s("udp_to_listener"), 102);
    assert!(s("udp_to_listener_bytes") >= bytes as u64);
    assert_eq!(s("udp_from_listener"), 102);
    assert_eq!(s("udp_drop_no_listener"), 1);
    assert_eq!(s("udp_drop_too_big"), 1);
    assert_eq!(s("udp_drop_no_rule"), 1);
    assert_eq!(s("udp_drop_bad_token"), 3);
    assert_eq!(
        s("udp_drop_stray"),
        3,
        "To and From from a sender, To from the old address"
    );
    assert_eq!(s("udp_drop_not_frame"), 1);
    assert_eq!(s("udp_dummies"), 2);
    assert_eq!(s("udp_rules_created"), 2);
    assert_eq!(s("udp_proxies"), 0);
    assert_eq!(s("udp_rules"), 0);
    assert!(log
        .iter()
        .any(|l| l.contains("registered udp socket local 10.1.0.5:9618")
            && l.contains(&proxy.to_string())));
    assert!(log
        .iter()
        .any(|l| l.contains("listener data address moved")));
}

#[test]
fn udp_rules_expire_and_resume() {
    let broker = Broker::start("127.0.0.1:0", &["--udp-rule-idle-ms", "400"]);
    let mut ctl = Client::new(broker.addr);
    let (proxy, token) = register_udp(&mut ctl, a("10.1.0.5:5000"), None);
    let data = sock("127.0.0.1:0");
    let sender = sock("127.0.0.1:0");
    dummy(&data, proxy, &token);
    let to_sender = frame(UdpKind::To, v4(sender.local_addr().unwrap()), b"late reply");

    round_trip(&sender, &data, proxy, b"hello", b"hi");
    // Replies keep the rule alive...
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(200));
        data.send_to(&to_sender, proxy).unwrap();
        let (b, _) = recv(&sender, Duration::from_secs(2)).expect("rule kept alive by replies");
        assert_eq!(b, b"late reply");
    }
    // ...until nothing is relayed for longer than the idle time.
    std::thread::sleep(Duration::from_millis(700));
    data.send_to(&to_sender, proxy).unwrap();
    silent(&sender, "expired rule");
    // Traffic resumes: a new rule, both ways again.
    round_trip(&sender, &data, proxy, b"back again", b"welcome back");

    let log = broker.stop();
    assert_eq!(stat(&log, "udp_rules_created"), 2);
    assert_eq!(stat(&log, "udp_rules_expired"), 1);
    assert_eq!(stat(&log, "udp_drop_no_rule"), 1);
    assert_eq!(stat(&log, "udp_from_listener"), 6);
}

#[test]
fn udp_rule_table_full_refuses_new_senders_only() {
    let broker = Broker::start(
        "127.0.0.1:0",
        &["--max-udp-rules", "3", "--max-udp-rules-per-proxy", "2"],
    );
    let mut ctl = Client::new(broker.addr);
    let (pa, ta) = register_udp(&mut ctl, a("10.1.0.5:1"), None);
    let (pb, tb) = register_udp(&mut ctl, a("10.1.0.5:2"), None);
    assert_ne!(pa, pb);
    let (da, db) = (sock("127.0.0.1:0"), sock("127.0.0.1:0"));
    dummy(&da, pa, &ta);
    dummy(&db, pb, &tb);
    let s: Vec<UdpSocket> = (1..=3).map(|i| sock(&format!("127.0.0.{i}:0"))).collect();

    round_trip(&s[0], &da, pa, b"s0", b"r0");
    round_trip(&s[1], &da, pa, b"s1", b"r1");
    // Per-proxy limit: s2 is refused on proxy A.
    s[2].send_to(b"s2", pa).unwrap();
    silent(&da, "per-proxy limit");
    broker.wait_log("refused new sender", Duration::from_secs(2));
    // Proxy B has room for one more rule broker-wide (3)...
    round_trip(&s[2], &db, pb, b"s2 to b", b"r2");
    // ...and then the global limit refuses s0 there.
    s[0].send_to(b"s0 to b", pb).unwrap();
    silent(&db, "global limit");
    // The live rules were not evicted: everyone admitted keeps working.
    for _ in 0..3 {
        round_trip(&s[0], &da, pa, b"s0 again", b"r0 again");
        round_trip(&s[1], &da, pa, b"s1 again", b"r1 again");
        round_trip(&s[2], &db, pb, b"s2 again", b"r2 again");
    }
    // The refused sender cannot be answered either.
    da.send_to(
        &frame(UdpKind::To, v4(s[2].local_addr().unwrap()), b"no"),
        pa,
    )
    .unwrap();
    silent(&s[2], "refused sender has no rule");

    let log = broker.stop();
    assert_eq!(stat(&log, "udp_drop_table_full"), 2);
    assert_eq!(stat(&log, "udp_rules"), 3);
    assert_eq!(stat(&log, "udp_to_listener"), 12);
    assert_eq!(stat(&log, "udp_drop_no_rule"), 1);
}

#[test]
fn udp_registration_lease_previous_proxy_and_distinct_ports() {
    let broker = Broker::start("127.0.0.1:0", &["--lease-ms", "1000"]);
    let mut ctl = Client::new(broker.addr);
    let local = a("10.1.0.5:7000");
    let (proxy, token) = register_udp(&mut ctl, local, None);
    // Heartbeats renew UDP registrations like TCP ones.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        match ctl.request(Body::Heartbeat {
            proxies: vec![proxy],
        }) {
            Some(Body::HeartbeatAck { unknown }) => assert!(unknown.is_empty()),
            other => panic!("{other:?}"),
        }
        ctl.idle(Duration::from_millis(300));
    }
    let data = sock("127.0.0.1:0");
    let sender = sock("127.0.0.1:0");
    dummy(&data, proxy, &token);
    round_trip(&sender, &data, proxy, b"alive", b"yes");
    // Without heartbeats the lease runs out and the socket closes.
    broker.wait_log(
        &format!("lease expired: proxy {proxy}"),
        Duration::from_secs(3),
    );
    sender.send_to(b"anyone?", proxy).unwrap();
    silent(&data, "expired registration");
    // Asking for the previous proxy without the proof of ownership gets another one
    // (the address stays reserved for its owner); with the proof, it comes back, with
    // the same token (a registration token is the proxy's, see gcb_proto::token).
    match ctl.request(Body::Register {
        transport: Transport::Udp,
        local: a("10.1.0.5:7002"),
        previous_proxy: Some(proxy),
        previous_token: Some("00112233445566778899aabbccddeeff".into()),
        punch: false,
    }) {
        Some(Body::Registered { proxy: p, .. }) => assert_ne!(p, proxy, "taken over"),
        other => panic!("{other:?}"),
    }
    let (again, token2) = register_udp(&mut ctl, local, Some(proxy));
    assert_eq!(again, proxy);
    assert_eq!(token2, token);
    // The right token from another IP than the registration's is refused (read off
    // the wire, it must not move the data address).
    let elsewhere = sock("127.0.0.3:0");
    elsewhere
        .send_to(
            &frame(UdpKind::Dummy, v4(a("0.0.0.0:0")), token2.as_bytes()),
            proxy,
        )
        .unwrap();
    silent(&elsewhere, "Dummy from a foreign IP");
    dummy(&data, proxy, &token2);
    round_trip(&sender, &data, proxy, b"new lease", b"ok");
    // A TCP registration asking for the UDP proxy's address gets the same port
    // (one port number for TCP and UDP, as HTCondor and iperf3 -u use), and the
    // UDP registration there keeps working.
    match ctl.request(Body::Register {
        transport: Transport::Tcp,
        local: a("10.1.0.5:7001"),
        previous_proxy: Some(proxy),
        previous_token: proof(proxy),
        punch: false,
    }) {
        Some(Body::Registered { proxy: p, .. }) => assert_eq!(p, proxy),
        other => panic!("{other:?}"),
    }
    round_trip(&sender, &data, proxy, b"still udp", b"ok");
    // A second UDP registration cannot take a port a UDP proxy already has.
    match ctl.request(Body::Register {
        transport: Transport::Udp,
        local: a("10.1.0.5:7002"),
        previous_proxy: Some(proxy),
        previous_token: None,
        punch: false,
    }) {
        Some(Body::Registered { proxy: p, .. }) => assert_ne!(p, proxy),
        other => panic!("{other:?}"),
    }
    let log = broker.stop();
    assert_eq!(stat(&log, "expired"), 1);
    assert_eq!(stat(&log, "udp_drop_bad_token"), 1);
}

/// The shim's keepalive (`KeepAlive`, a Dummy without ack) records the data address like
/// a Dummy, and nothing is sent back to the listener's socket (which belongs to the
/// program); a wrong token is still refused.
#[test]
fn keepalive_sets_the_data_address_without_an_ack() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    let mut ctl = Client::new(broker.addr);
    let (proxy, token) = register_udp(&mut ctl, a("10.1.0.5:5001"), None);
    let data = sock("127.0.0.1:0");
    let sender = sock("127.0.0.1:0");
    let keepalive = |t: &str| frame(UdpKind::KeepAlive, v4(a("0.0.0.0:0")), t.as_bytes());
    data.send_to(&keepalive(&"0".repeat(32)), proxy).unwrap();
    silent(&data, "ack or data after a wrong-token keepalive");
    data.send_to(&keepalive(&token), proxy).unwrap();
    silent(&data, "ack after a keepalive");
    round_trip(&sender, &data, proxy, b"via keepalive", b"ok");
    let log = broker.stop();
    assert_eq!(stat(&log, "udp_drop_bad_token"), 1);
    assert_eq!(stat(&log, "udp_dummies"), 1);
}

/// `punch_request` as the registrant of `from` (token `token`) toward `to`: the
/// `punch` answer's (peer, me).
fn punch(
    c: &mut Client,
    to: SocketAddr,
    from: SocketAddr,
    token: &str,
) -> (SocketAddrV4, SocketAddrV4) {
    match c.request(Body::PunchRequest {
        proxy: to,
        from_proxy: from,
        token: token.to_owned(),
    }) {
        Some(Body::Punch { peer, me, .. }) => (peer, me),
        other => panic!("punch {from} -> {to}: {other:?}"),
    }
}

/// When a UDP registration that was paired for a hole punch goes away (unregister, or
/// its lease runs out), its still-registered partner gets `punch_end` naming the gone
/// side by its data address as handed out and by its proxy, and acks it.
#[test]
fn punch_end_tells_the_partner_when_a_paired_registration_goes() {
    let broker = Broker::start("127.0.0.1:0", &["--lease-ms", "2000"]);
    let (mut ctl_a, mut ctl_b) = (Client::new(broker.addr), Client::new(broker.addr));
    let (pa, ta) = register_udp(&mut ctl_a, a("10.1.0.5:9000"), None);
    let (pb, tb) = register_udp(&mut ctl_b, a("10.2.0.5:9100"), None);
    let (da, db) = (sock("127.0.0.1:0"), sock("127.0.0.1:0"));
    let (data_a, data_b) = (dummy(&da, pa, &ta), dummy(&db, pb, &tb));
    let is_end = |b: &Body| matches!(b, Body::PunchEnd { .. });
    let wait = Duration::from_secs(5);

    // B punches to A, then unregisters: A (the destination) keys its record by B's data
    // address.
    assert_eq!(punch(&mut ctl_b, pa, pb, &tb), (data_a, data_b));
    assert!(ctl_a
        .wait_request(wait, |b| matches!(b, Body::PunchBack { .. }))
        .is_some());
    assert!(ctl_b
        .wait_request(Duration::from_millis(300), is_end)
        .is_none());
    match ctl_b.request(Body::Unregister {
        proxy: pb,
        transport: Some(Transport::Udp),
        token: proof(pb),
    }) {
        Some(Body::Ack {}) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ctl_a.wait_request(wait, is_end),
        Some(Body::PunchEnd {
            proxy: pa,
            peer: data_b,
            peer_proxy: v4(pb),
        })
    );

    // A punches to C, then stops renewing its lease: C hears of it when it expires.
    let (pc, tc) = register_udp(&mut ctl_b, a("10.2.0.5:9200"), None);
    let dc = sock("127.0.0.1:0");
    let data_c = dummy(&dc, pc, &tc);
    assert!(matches!(
        ctl_a.request(Body::Heartbeat { proxies: vec![pa] }),
        Some(Body::HeartbeatAck { .. })
    ));
    assert_eq!(punch(&mut ctl_a, pc, pa, &ta), (data_c, data_a));
    let t = Instant::now();
    let end = loop {
        assert!(t.elapsed() < Duration::from_secs(10), "no punch_end for C");
        assert!(matches!(
            ctl_b.request(Body::Heartbeat { proxies: vec![pc] }),
            Some(Body::HeartbeatAck { unknown }) if unknown.is_empty()
        ));
        if let Some(e) = ctl_b.wait_request(Duration::from_millis(300), is_end) {
            break e;
        }
    };
    assert_eq!(
        end,
        Body::PunchEnd {
            proxy: pc,
            peer: data_a,
            peer_proxy: v4(pa),
        }
    );
    broker.wait_log(&format!("lease expired: proxy {pa}"), wait);
    ctl_b.idle(Duration::from_millis(200)); // the ack goes out

    let log = broker.stop();
    assert_eq!(stat(&log, "udp_punches"), 2);
    assert_eq!(stat(&log, "udp_punch_ends"), 2);
    assert_eq!(stat(&log, "udp_punch_end_failures"), 0);
    assert_eq!(stat(&log, "expired"), 1);
}
