//! End-to-end tests of the real `gcb-brokerd` binary on loopback.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use gcb_proto::{token, Body, ConnectId, ErrorCode, Route, Transport};

const MIB: usize = 1 << 20;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn register(c: &mut Client, local: SocketAddr, previous: Option<SocketAddr>) -> SocketAddr {
    register_with_key(c, local, previous).0
}

/// Registration tokens handed out, by proxy.
static TOKENS: std::sync::Mutex<Vec<(SocketAddr, [u8; 16])>> = std::sync::Mutex::new(Vec::new());

/// The ownership proof of the TCP registration at `proxy` (gcb_proto::token).
fn proof(proxy: SocketAddr) -> Option<String> {
    let tokens = TOKENS.lock().unwrap();
    let (_, t) = tokens.iter().rev().find(|(p, _)| *p == proxy)?;
    Some(token::present_hex(
        Some(&test_key()),
        token::Use::Ownership,
        t,
    ))
}

/// Registers a TCP listener (proving it owned `previous`, if given); returns its proxy
/// and its standby key (the registration token presented for standbys).
fn register_with_key(
    c: &mut Client,
    local: SocketAddr,
    previous: Option<SocketAddr>,
) -> (SocketAddr, String) {
    match c.request(Body::Register {
        transport: Transport::Tcp,
        local,
        previous_proxy: previous,
        previous_token: previous.and_then(proof),
        punch: false,
    }) {
        Some(Body::Registered {
            proxy,
            lease_ms,
            token: Some(tok),
        }) => {
            assert!(lease_ms > 0);
            let t = token::from_hex(&tok)
                .unwrap_or_else(|| panic!("a registration token is 32 hex: {tok:?}"));
            TOKENS.lock().unwrap().push((proxy, t));
            let key = token::present_hex(Some(&test_key()), token::Use::Standby, &t);
            assert_ne!(key, tok, "the standby key is not the token");
            (proxy, key)
        }
        other => panic!("register: {other:?}"),
    }
}

fn expect_connect_back(c: &mut Client) -> (ConnectId, SocketAddr, SocketAddr, SocketAddr) {
    match c.wait_request(Duration::from_secs(10), |b| {
        matches!(b, Body::ConnectBack { .. })
    }) {
        Some(Body::ConnectBack {
            connect_id,
            dial,
            proxy,
            logical_peer,
        }) => (connect_id, dial, proxy, logical_peer),
        other => panic!("no connect_back: {other:?}"),
    }
}

/// `connector` writes 1 MiB and half-closes; `listener` reads it all, then
/// answers 1 MiB and closes; both sides check SHA-256.
fn exchange_half_close(mut connector: TcpStream, mut listener: TcpStream, seed: u64) {
    let up = random_data(MIB, seed);
    let down = random_data(MIB, seed ^ 0xdead_beef);
    let (up_sum, down_sum) = (sha256(&up), sha256(&down));
    let tc = std::thread::spawn(move || {
        connector.write_all(&up).unwrap();
        connector.shutdown(Shutdown::Write).unwrap();
        read_all(&mut connector).unwrap()
    });
    let tl = std::thread::spawn(move || {
        let got = read_all(&mut listener).unwrap();
        listener.write_all(&down).unwrap();
        listener.shutdown(Shutdown::Write).unwrap();
        got
    });
    let got_up = tl.join().unwrap();
    let got_down = tc.join().unwrap();
    assert_eq!(got_up.len(), MIB);
    assert_eq!(sha256(&got_up), up_sum, "connector -> listener corrupted");
    assert_eq!(got_down.len(), MIB);
    assert_eq!(
        sha256(&got_down),
        down_sum,
        "listener -> connector corrupted"
    );
}

/// Both sides write 1 MiB at the same time while reading.
fn exchange_full_duplex(x: TcpStream, y: TcpStream, seed: u64) {
    let side = |mut s: TcpStream, out: Vec<u8>| {
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || read_all(&mut r).unwrap());
        s.write_all(&out).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        reader.join().unwrap()
    };
    let dx = random_data(MIB, seed);
    let dy = random_data(MIB, seed + 1);
    let (sx, sy) = (sha256(&dx), sha256(&dy));
    let tx = std::thread::spawn(move || side(x, dx));
    let ty = std::thread::spawn(move || side(y, dy));
    let got_at_y = ty.join().unwrap();
    let got_at_x = tx.join().unwrap();
    assert_eq!(sha256(&got_at_y), sx);
    assert_eq!(sha256(&got_at_x), sy);
}

#[test]
fn regular_connector_is_relayed_through_proxy() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    let mut listener = Client::new(broker.addr);
    let proxy = register(&mut listener, a("10.1.0.5:9618"), None);
    assert_eq!(proxy.ip(), broker.addr.ip());
    assert_ne!(proxy.port(), broker.addr.port());
    // Idempotent: the same client registering the same socket again.
    assert_eq!(register(&mut listener, a("10.1.0.5:9618"), None), proxy);

    // A plain TCP client connects to the proxy and starts sending at once;
    // those bytes must survive until the listener's dial-back is spliced.
    let connector = TcpStream::connect(proxy).unwrap();
    let connector_addr = connector.local_addr().unwrap();
    let (id, dial, p, logical_peer) = expect_connect_back(&mut listener);
    assert_eq!(dial, broker.addr, "dial-back goes to the relay port");
    assert_eq!(p, proxy);
    assert_eq!(logical_peer, connector_addr);
    let back = dial_with_id(dial, &id.to_string());
    exchange_half_close(connector, back, 1);
    broker.wait_log("relay closed", Duration::from_secs(5));

    // Second connection on the same registration, full duplex.
    let connector = TcpStream::connect(proxy).unwrap();
    let (id, dial, ..) = expect_connect_back(&mut listener);
    let back = dial_with_id(dial, &id.to_string());
    exchange_full_duplex(connector, back, 7);

    // A used connect id is refused.
    let mut again = dial_with_id(dial, &id.to_string());
    let mut buf = [0u8; 1];
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(again.read(&mut buf), Ok(0) | Err(_)));

    let log = broker.stop();
    assert_eq!(stat(&log, "relays_started"), 2);
    assert!(stat(&log, "relay_bytes") >= 4 * MIB as u64);
    assert!(stat(&log, "bad_preambles") >= 1);
    assert!(log.iter().any(
        |l| l.contains("registered tcp listener local 10.1.0.5:9618")
            && l.contains(&proxy.to_string())
    ));
}

#[test]
fn brokered_decisions_direct_and_relay() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    // Listener claims a private local address behind "NAT" 127.0.0.1.
    let mut listener = Client::new(broker.addr);
    let proxy = register(&mut listener, a("10.1.0.5:9618"), None);

    // Connector from another "NAT" (127.0.0.2): relay.
    let mut connector = Client::bind("127.0.0.2:0", broker.addr, Some(TEST_KEY));
    let route = match connector.request(Body::ConnectRequest {
        proxy,
        transport: Transport::Tcp,
        connector_local: a("10.2.0.7:5000"),
        connector_listen: None,
        punch: false,
    }) {
        Some(Body::ConnectDecision { route }) => route,
        other => panic!("{other:?}"),
    };
    let Route::Relay { addr, connect_id } = route else {
        panic!("expected relay, got {route:?}");
    };
    assert_eq!(addr, broker.addr);
    // The connector dials first; the listener is told to dial back with the
    // same id.
    let c = dial_with_id(addr, &connect_id.to_string());
    let (id, dial, p, peer) = expect_connect_back(&mut listener);
    assert_eq!(id, connect_id);
    assert_eq!((dial, p), (broker.addr, proxy));
    assert_eq!(peer, connector.local_addr());
    let l = dial_with_id(dial, &id.to_string());
    exchange_half_close(c, l, 3);

    // Same host (same observed IP) and the listener's local is loopback:
    // direct.
    let mut same = Client::new(broker.addr);
    match same.request(Body::ConnectRequest {
        proxy,
        transport: Transport::Tcp,
        connector_local: a("10.1.0.6:5000"),
        connector_listen: None,
        punch: false,
    }) {
        Some(Body::ConnectDecision {
            route: Route::Direct { addr },
        }) => assert_eq!(addr, a("10.1.0.5:9618")),
        other => panic!("{other:?}"),
    }

    // Unknown proxy.
    match same.request(Body::ConnectRequest {
        proxy: a("127.0.0.1:1"),
        transport: Transport::Tcp,
        connector_local: a("10.1.0.6:5000"),
        connector_listen: None,
        punch: false,
    }) {
        Some(Body::Error { code, .. }) => assert_eq!(code, ErrorCode::NoSuchRegistration),
        other => panic!("{other:?}"),
    }
    // UDP senders send to the proxy; a udp connect_request is not brokered.
    match same.request(Body::ConnectRequest {
        proxy,
        transport: Transport::Udp,
        connector_local: a("10.1.0.6:5000"),
        connector_listen: None,
        punch: false,
    }) {
        Some(Body::Error { code, .. }) => assert_eq!(code, ErrorCode::Unsupported),
        other => panic!("{other:?}"),
    }
    let log = broker.stop();
    assert_eq!(stat(&log, "relay"), 1);
    assert_eq!(stat(&log, "direct"), 1);
}

#[test]
fn lease_expiry_closes_proxy_and_heartbeats_keep_it() {
    let broker = Broker::start("127.0.0.1:0", &["--lease-ms", "1000"]);
    let mut kept = Client::new(broker.addr);
    let mut lapsed = Client::new(broker.addr);
    let p_kept = register(&mut kept, a("10.1.0.5:1"), None);
    let p_lapsed = register(&mut lapsed, a("10.1.0.5:2"), None);
    TcpStream::connect(p_lapsed).expect("proxy open after register");
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        match kept.request(Body::Heartbeat {
            proxies: vec![p_kept],
        }) {
            Some(Body::HeartbeatAck { unknown }) => assert!(unknown.is_empty()),
            other => panic!("{other:?}"),
        }
        kept.idle(Duration::from_millis(300));
    }
    broker.wait_log(
        &format!("lease expired: proxy {p_lapsed}"),
        Duration::from_secs(2),
    );
    let e = TcpStream::connect(p_lapsed).expect_err("expired proxy must be closed");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    TcpStream::connect(p_kept).expect("heartbeated proxy still open");
    // The lapsed client is now unknown: its heartbeat says so.
    match lapsed.request(Body::Heartbeat {
        proxies: vec![p_lapsed],
    }) {
        Some(Body::HeartbeatAck { unknown }) => assert_eq!(unknown, vec![p_lapsed]),
        other => panic!("{other:?}"),
    }
    let log = broker.stop();
    assert_eq!(stat(&log, "expired"), 1);
}

/// Unkeyed, a heartbeat's source is unproven: an unknown one gets its `heartbeat_ack`
/// (whose `unknown` list is the client's cue) but no `reregister_request`, whose
/// retransmissions would amplify a spoofed heartbeat toward its victim.
#[test]
fn unkeyed_unknown_heartbeat_gets_no_reregister_request() {
    let broker = Broker::start("127.0.0.1:0", &["--insecure"]);
    let mut c = Client::bind("127.0.0.1:0", broker.addr, None);
    let ghost = a("127.0.0.1:1");
    match c.request(Body::Heartbeat {
        proxies: vec![ghost],
    }) {
        Some(Body::HeartbeatAck { unknown }) => assert_eq!(unknown, vec![ghost]),
        other => panic!("{other:?}"),
    }
    assert!(c
        .wait_request(Duration::from_secs(2), |b| matches!(
            b,
            Body::ReregisterRequest {}
        ))
        .is_none());
    let log = broker.stop();
    assert_eq!(stat(&log, "reregister_sent"), 0);
}

#[test]
fn restart_recovery_reregisters_with_same_proxy() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    let addr = broker.addr;
    let mut c = Client::new(addr);
    let local = a("10.1.0.5:9618");
    let proxy = register(&mut c, local, None);
    broker.stop();

    let broker = Broker::start(&addr.to_string(), &[]);
    assert_eq!(broker.addr, addr);
    match c.request(Body::Heartbeat {
        proxies: vec![proxy],
    }) {
        Some(Body::HeartbeatAck { unknown }) => assert_eq!(unknown, vec![proxy]),
        other => panic!("{other:?}"),
    }
    // Keyed, the heartbeat is authenticated: the broker asks the client to re-register.
    c.wait_request(Duration::from_secs(5), |b| {
        matches!(b, Body::ReregisterRequest {})
    })
    .expect("reregister_request after a heartbeat from an unknown client");
    // The proxy comes back only with the proof of ownership (the restarted broker
    // recomputes the token from the pool key).
    assert_eq!(register(&mut c, local, Some(proxy)), proxy);
    // Known again.
    match c.request(Body::Heartbeat {
        proxies: vec![proxy],
    }) {
        Some(Body::HeartbeatAck { unknown }) => assert!(unknown.is_empty()),
        other => panic!("{other:?}"),
    }
    // And it works: a connection to the proxy reaches the client.
    let conn = TcpStream::connect(proxy).unwrap();
    let (id, dial, ..) = expect_connect_back(&mut c);
    let mut back = dial_with_id(dial, &id.to_string());
    let mut conn2 = conn.try_clone().unwrap();
    conn2.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    back.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    back.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    let log = broker.stop();
    assert_eq!(stat(&log, "reregister_sent"), 1);
}

#[test]
fn junk_is_dropped_and_counted() {
    let mut broker = Broker::start("127.0.0.1:0", &["--preamble-timeout-ms", "500"]);
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut n = 0;
    for i in 0..300u64 {
        let len = (i as usize * 37) % 1500 + 1;
        let mut d = random_data(len, i + 100);
        if i % 3 == 0 && d.len() > 8 {
            // Valid frame header, garbage JSON.
            d[..5].copy_from_slice(b"GCB1\0");
        }
        junk.send_to(&d, broker.addr).unwrap();
        n += 1;
        if i % 20 == 0 {
            // Pace the burst so the kernel does not drop datagrams before
            // the broker sees them (drops there are not the broker's).
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    junk.send_to(b"GCB1\0{\"v\":1,\"id\":1,\"body\":{\"type\":", broker.addr)
        .unwrap();
    n += 1;
    // Junk on the relay port: bad bytes, an unknown id, silence.
    let mut bad = TcpStream::connect(broker.addr).unwrap();
    bad.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(read_all(&mut bad).map(|v| v.is_empty()).unwrap_or(true));
    let mut unknown = dial_with_id(broker.addr, &"0".repeat(32));
    assert!(read_all(&mut unknown).map(|v| v.is_empty()).unwrap_or(true));
    let mut silent = TcpStream::connect(broker.addr).unwrap();
    assert!(read_all(&mut silent).map(|v| v.is_empty()).unwrap_or(true));

    // Still serving.
    let mut c = Client::new(broker.addr);
    register(&mut c, a("10.1.0.5:1"), None);
    assert!(broker.alive());
    let log = broker.stop();
    assert!(stat(&log, "junk_datagrams") >= n, "junk not counted");
    assert_eq!(stat(&log, "bad_preambles"), 2);
    assert_eq!(stat(&log, "preamble_timeouts"), 1);
}

#[test]
fn listener_that_never_dials_back_gets_connector_closed() {
    let broker = Broker::start("127.0.0.1:0", &["--connect-timeout-ms", "800"]);
    let mut listener = Client::new(broker.addr);
    let proxy = register(&mut listener, a("10.1.0.5:9618"), None);
    let mut conn = TcpStream::connect(proxy).unwrap();
    expect_connect_back(&mut listener); // ...and ignore it
    conn.write_all(b"anyone there?").unwrap();
    let t = Instant::now();
    let r = read_all(&mut conn);
    assert!(matches!(&r, Ok(v) if v.is_empty()) || r.is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
    let log = broker.stop();
    assert_eq!(stat(&log, "pairing_timeouts"), 1);
}

#[test]
fn limits_are_enforced_with_explicit_refusals() {
    let broker = Broker::start(
        "127.0.0.1:0",
        &[
            "--max-registrations-per-ip",
            "1",
            "--max-registrations",
            "2",
            "--max-relays",
            "1",
        ],
    );
    let mut c1 = Client::new(broker.addr);
    let p1 = register(&mut c1, a("10.1.0.5:1"), None);
    match c1.request(Body::Register {
        transport: Transport::Tcp,
        local: a("10.1.0.5:2"),
        previous_proxy: None,
        previous_token: None,
        punch: false,
    }) {
        Some(Body::Error { code, reason }) => {
            assert_eq!(code, ErrorCode::Quota);
            assert!(reason.contains("per-IP"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The quota is per IP: another source port of the same host shares it.
    let mut c1b = Client::new(broker.addr);
    match c1b.request(Body::Register {
        transport: Transport::Tcp,
        local: a("10.1.0.5:3"),
        previous_proxy: None,
        previous_token: None,
        punch: false,
    }) {
        Some(Body::Error { code, .. }) => assert_eq!(code, ErrorCode::Quota),
        other => panic!("{other:?}"),
    }
    // Other hosts (other loopback IPs) have their own; then the global cap holds.
    let mut c2 = Client::bind("127.0.0.2:0", broker.addr, Some(TEST_KEY));
    register(&mut c2, a("10.1.0.6:1"), None);
    let mut c3 = Client::bind("127.0.0.3:0", broker.addr, Some(TEST_KEY));
    match c3.request(Body::Register {
        transport: Transport::Tcp,
        local: a("10.1.0.7:1"),
        previous_proxy: None,
        previous_token: None,
        punch: false,
    }) {
        Some(Body::Error { code, .. }) => assert_eq!(code, ErrorCode::Quota),
        other => panic!("{other:?}"),
    }
    // One relay slot: the first connection waits for its dial-back, the
    // second is reset.
    let _first = TcpStream::connect(p1).unwrap();
    expect_connect_back(&mut c1);
    let mut second = TcpStream::connect(p1).unwrap();
    let r = read_all(&mut second);
    assert!(matches!(&r, Ok(v) if v.is_empty()) || r.is_err());
    broker.wait_log("relay limit (1) reached", Duration::from_secs(5));
    let log = broker.stop();
    assert_eq!(stat(&log, "refused"), 3);
    assert_eq!(stat(&log, "conns_refused"), 1);
}

#[test]
fn pool_key_is_required_when_configured() {
    let dir = std::env::temp_dir().join(format!("gcb-brokerd-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("pool.key");
    let key = b"a-pool-key-for-the-broker-tests\n";
    std::fs::write(&key_file, key).unwrap();
    let broker = Broker::start("127.0.0.1:0", &["--key-file", key_file.to_str().unwrap()]);
    let mut good = Client::bind("127.0.0.1:0", broker.addr, Some(key));
    register(&mut good, a("10.1.0.5:1"), None);
    let mut bad = Client::bind("127.0.0.1:0", broker.addr, None);
    let t = Instant::now();
    assert_eq!(
        bad.request(Body::Register {
            transport: Transport::Tcp,
            local: a("10.1.0.5:2"),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        }),
        None,
        "unkeyed request must get no answer"
    );
    assert!(t.elapsed() >= Duration::from_secs(5));
    let log = broker.stop();
    assert_eq!(stat(&log, "registered"), 1);
    assert!(stat(&log, "junk_datagrams") >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn allow_list_drops_other_sources() {
    let broker = Broker::start("127.0.0.1:0", &["--allow", "127.0.0.2/32"]);
    let mut ok = Client::bind("127.0.0.2:0", broker.addr, Some(TEST_KEY));
    register(&mut ok, a("10.1.0.5:1"), None);
    let denied = Client::bind("127.0.0.1:0", broker.addr, Some(TEST_KEY));
    denied.sock.send_to(b"hello", broker.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let log = broker.stop();
    assert!(stat(&log, "not_allowed") >= 1);
    drop(denied);
}

/// Without a key the broker refuses to start unless told `--insecure`; then it says so
/// once and serves unauthenticated requests from loopback.
#[test]
fn no_key_needs_insecure_and_is_said_out_loud() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gcb-brokerd"))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("GCB_KEY_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("gcb-brokerd: error: no pool key"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let broker = Broker::start("127.0.0.1:0", &["--insecure", "--allow", "10.9.0.0/16"]);
    let line = broker.wait_log("--insecure: no pool key", Duration::from_secs(2));
    assert!(
        line.contains("127.0.0.0/8") && line.contains("10.9.0.0/16"),
        "{line}"
    );
    let mut c = Client::bind("127.0.0.1:0", broker.addr, None);
    match c.request(Body::Register {
        transport: Transport::Tcp,
        local: a("10.1.0.5:1"),
        previous_proxy: None,
        previous_token: None,
        punch: false,
    }) {
        Some(Body::Registered { .. }) => {}
        other => panic!("{other:?}"),
    }
    broker.stop();
}

/// Parks a standby connection for `key` at the relay port.
fn park_standby(relay: SocketAddr, key: &str) -> TcpStream {
    let mut s = TcpStream::connect(relay).unwrap();
    s.write_all(format!("GCB-STANDBY {key}\n").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads a standby's claim and returns the logical peer it names.
fn read_claim(s: &mut TcpStream) -> SocketAddr {
    let mut go = [0u8; gcb_proto::preamble::GO_LEN];
    s.read_exact(&mut go).unwrap();
    SocketAddr::V4(gcb_proto::preamble::parse_go(&go).expect("a GCB-GO claim"))
}

#[test]
fn standby_is_claimed_for_a_proxy_connection_without_connect_back() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    let mut listener = Client::new(broker.addr);
    let (proxy, key) = register_with_key(&mut listener, a("10.1.0.5:9700"), None);
    let mut standby = park_standby(broker.addr, &key);
    std::thread::sleep(Duration::from_millis(100));

    // A plain connector: the broker claims the standby with the connector's address.
    let connector = TcpStream::connect(proxy).unwrap();
    let connector_addr = connector.local_addr().unwrap();
    assert_eq!(read_claim(&mut standby), connector_addr);
    standby
        .write_all(&[gcb_proto::preamble::CLAIM_ACK])
        .unwrap();
    // No connect_back was sent for it.
    assert!(listener
        .wait_request(Duration::from_millis(300), |b| matches!(
            b,
            Body::ConnectBack { .. }
        ))
        .is_none());
    exchange_half_close(connector, standby, 11);

    // A relay decision (a private connector) claims the next standby as well.
    let mut standby = park_standby(broker.addr, &key);
    std::thread::sleep(Duration::from_millis(100));
    // From another "NAT" (127.0.0.2): a relay decision.
    let mut connector_ctl = Client::bind("127.0.0.2:0", broker.addr, Some(TEST_KEY));
    let route = match connector_ctl.request(Body::ConnectRequest {
        proxy,
        transport: Transport::Tcp,
        connector_local: a("10.2.0.9:0"),
        connector_listen: None,
        punch: false,
    }) {
        Some(Body::ConnectDecision { route }) => route,
        other => panic!("no decision: {other:?}"),
    };
    let Route::Relay { addr, connect_id } = route else {
        panic!("expected relay, got {route:?}")
    };
    assert_eq!(
        read_claim(&mut standby).ip(),
        connector_ctl.local_addr().ip()
    );
    standby
        .write_all(&[gcb_proto::preamble::CLAIM_ACK])
        .unwrap();
    let connector = dial_with_id(addr, &connect_id.to_string());
    exchange_full_duplex(connector, standby, 12);

    let log = broker.stop();
    assert_eq!(stat(&log, "standby_claimed"), 2);
    assert_eq!(stat(&log, "standby_fallbacks"), 0);
    assert_eq!(stat(&log, "relays_started"), 2);
}

#[test]
fn standby_with_unknown_key_is_closed_and_unacked_claim_falls_back() {
    let broker = Broker::start("127.0.0.1:0", &[]);
    let mut listener = Client::new(broker.addr);
    let (proxy, key) = register_with_key(&mut listener, a("10.1.0.5:9701"), None);

    // A standby presenting a key no registration has: closed without a claim.
    let mut bogus = park_standby(broker.addr, &"ab".repeat(16));
    let mut buf = [0u8; 1];
    assert!(matches!(bogus.read(&mut buf), Ok(0) | Err(_)));

    // A standby that never acks its claim: after a second the broker sends a
    // connect_back instead, and the dial-back carries the connection.
    let mut mute = park_standby(broker.addr, &key);
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let connector = TcpStream::connect(proxy).unwrap();
    assert_eq!(read_claim(&mut mute), connector.local_addr().unwrap());
    let (id, dial, p, _) = expect_connect_back(&mut listener);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "fell back too early"
    );
    assert_eq!(p, proxy);
    // The abandoned standby is reset.
    assert!(matches!(mute.read(&mut buf), Ok(0) | Err(_)));
    let back = dial_with_id(dial, &id.to_string());
    exchange_half_close(connector, back, 13);

    let log = broker.stop();
    assert_eq!(stat(&log, "standby_refused"), 1);
    assert_eq!(stat(&log, "standby_fallbacks"), 1);
    assert_eq!(stat(&log, "standby_claimed"), 0);
    assert_eq!(stat(&log, "relays_started"), 1);
}
