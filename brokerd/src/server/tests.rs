//! The handlers driven with a fake clock and predictable random bytes: timers that
//! take seconds to minutes in the daemon (leases, reservations, connect ids, relay
//! idle time) are checked here without sleeping, on real loopback sockets.

use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use gcb_proto::{Body, ErrorCode, Now, Transport};
use mio::net::TcpStream;

use super::env::{Clock, Random};
use super::{Config, Server};
use crate::allow::AllowList;

/// A clock that moves only when told to.
#[derive(Clone)]
struct FakeClock(Rc<Cell<Now>>);

impl FakeClock {
    fn new() -> FakeClock {
        FakeClock(Rc::new(Cell::new(Now {
            mono: Instant::now(),
            unix_ms: 1_700_000_000_000,
        })))
    }

    fn advance(&self, d: Duration) {
        let n = self.0.get();
        self.0.set(Now {
            mono: n.mono + d,
            unix_ms: n.unix_ms + d.as_millis() as u64,
        });
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Now {
        self.0.get()
    }
}

/// Fills the n-th request for bytes with the byte n (1, 2, 3...).
struct Counting(u8);

impl Random for Counting {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0 += 1;
        buf.fill(self.0);
    }
}

fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        key: None,
        allow: AllowList::default(),
        max_registrations: 100,
        max_registrations_per_ip: 100,
        max_relays: 100,
        max_relays_per_ip: 100,
        max_pending_per_proxy: 100,
        max_pending_per_ip: 100,
        max_preambles: 100,
        max_preambles_per_ip: 100,
        control_rate_per_ip: 0,
        control_burst_per_ip: 0,
        relay_idle: Some(Duration::from_secs(60)),
        lease: Duration::from_secs(35),
        connect_timeout: Duration::from_secs(20),
        preamble_timeout: Duration::from_secs(15),
        stats_interval: None,
        udp_rule_idle: Duration::from_secs(60),
        max_udp_rules: 100,
        max_udp_rules_per_proxy: 100,
        max_udp_rules_per_sender_ip: 100,
        proxy_reserve: Duration::from_secs(120),
        advertise: None,
        proxy_ports: None,
        proxy_ips: Vec::new(),
        drain_grace: Duration::from_secs(30),
    }
}

/// A broker on 127.0.0.1 with a fake clock. Random draws 1 and 2 are taken by the
/// endpoint's session and the (unkeyed) token secret: the first connect id is [3; 16].
fn broker(cfg: Config) -> (Server, FakeClock) {
    let clock = FakeClock::new();
    let server = Server::bind_with(cfg, Box::new(clock.clone()), Box::new(Counting(0))).unwrap();
    (server, clock)
}

const CLIENT: &str = "127.0.0.1:40000";

/// Registers a TCP listener for [`CLIENT`]; returns its proxy address.
fn register_tcp(s: &mut Server, local: &str) -> SocketAddr {
    let reply = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: local.parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    );
    match reply {
        Body::Registered { proxy, .. } => proxy,
        other => panic!("register answered {other:?}"),
    }
}

/// Asserts that the broker reset `s` (what a peer sees after SO_LINGER 0 and close).
fn assert_reset(mut s: StdStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes instead of a reset"),
    }
}

/// Connects to a proxy listener and has the broker accept it.
fn connect_to_proxy(s: &mut Server, proxy: SocketAddr) -> StdStream {
    let c = StdStream::connect(proxy).unwrap();
    let before = s.counters.proxy_accepts;
    for _ in 0..100 {
        s.on_proxy_accept(proxy);
        if s.counters.proxy_accepts > before {
            return c;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the broker never accepted the proxy connection");
}

#[test]
fn lease_expires_on_time_and_heartbeats_renew_it() {
    let (mut s, clock) = broker(config());
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    clock.advance(Duration::from_secs(30));
    let ack = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Heartbeat {
            proxies: vec![proxy],
        },
    );
    assert!(
        matches!(&ack, Body::HeartbeatAck { unknown } if unknown.is_empty()),
        "{ack:?}"
    );
    // 64 s after the registration, 34 s after the heartbeat: still leased.
    clock.advance(Duration::from_secs(34));
    s.timers();
    assert_eq!(s.registry.len(), 1);
    assert!(s.proxies.contains_key(&proxy));
    clock.advance(Duration::from_millis(1001));
    s.timers();
    assert_eq!(s.registry.len(), 0);
    assert_eq!(s.counters.expired, 1);
    assert!(!s.proxies.contains_key(&proxy), "proxy socket still open");
    // The proxy listener is closed: nobody can connect to it any more.
    assert!(StdStream::connect(proxy).is_err());
}

#[test]
fn freed_proxy_stays_reserved_for_its_owner_until_the_reservation_lapses() {
    let (mut s, clock) = broker(config());
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    clock.advance(Duration::from_secs(36));
    s.timers();
    assert_eq!(s.counters.expired, 1);
    let until = s.reserved.get(&(Transport::Tcp, proxy)).copied();
    assert_eq!(until, Some(clock.now().mono + Duration::from_secs(120)));
    // Registrations meanwhile keep it reserved...
    clock.advance(Duration::from_secs(119));
    register_tcp(&mut s, "10.1.0.5:9619");
    assert!(s.reserved.contains_key(&(Transport::Tcp, proxy)));
    // ...and the first one after the reservation ends forgets it.
    clock.advance(Duration::from_secs(2));
    register_tcp(&mut s, "10.1.0.5:9620");
    assert!(!s.reserved.contains_key(&(Transport::Tcp, proxy)));
}

#[test]
fn unanswered_connect_back_gives_up_with_the_endpoint_and_resets_the_connector() {
    let (mut s, clock) = broker(config());
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    let connector = connect_to_proxy(&mut s, proxy);
    // The connect id is the injected random draw.
    let p = s.pending.values().next().expect("pairing");
    assert_eq!(p.raw, [3; 16]);
    assert!(p.connect_back.is_some());
    // Nobody answers at CLIENT: the endpoint retransmits, then gives up after its
    // 10 s deadline, well before the 20 s pairing timeout.
    for _ in 0..99 {
        clock.advance(Duration::from_millis(100));
        s.timers();
    }
    assert_eq!(s.counters.connect_back_failures, 0);
    assert_eq!(s.pending.len(), 1);
    for _ in 0..20 {
        clock.advance(Duration::from_millis(100));
        s.timers();
    }
    assert_eq!(s.counters.connect_back_failures, 1);
    assert_eq!(s.counters.pairing_timeouts, 0);
    assert!(s.pending.is_empty());
    assert_reset(connector);
}

#[test]
fn pairing_times_out_after_connect_timeout() {
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_secs(2);
    let (mut s, clock) = broker(cfg);
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    let connector = connect_to_proxy(&mut s, proxy);
    clock.advance(Duration::from_millis(1999));
    s.timers();
    assert_eq!(s.pending.len(), 1);
    // Deadlines are swept every 100 ms at most.
    clock.advance(Duration::from_millis(100));
    s.timers();
    assert!(s.pending.is_empty());
    assert_eq!(s.counters.pairing_timeouts, 1);
    assert_reset(connector);
}

#[test]
fn relay_port_connection_without_preamble_times_out() {
    let (mut s, clock) = broker(config());
    let c = StdStream::connect(s.local_addr()).unwrap();
    for _ in 0..100 {
        s.on_relay_accept();
        if !s.preambles.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.preambles.len(), 1);
    clock.advance(Duration::from_millis(14_999));
    s.timers();
    assert_eq!(s.preambles.len(), 1);
    // Deadlines are swept every 100 ms at most.
    clock.advance(Duration::from_millis(100));
    s.timers();
    assert!(s.preambles.is_empty());
    assert_eq!(s.counters.preamble_timeouts, 1);
    assert_reset(c);
}

/// A connected pair on loopback: (our end, the broker's end as a mio stream).
fn pair() -> (StdStream, TcpStream) {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let ours = StdStream::connect(l.local_addr().unwrap()).unwrap();
    let (theirs, _) = l.accept().unwrap();
    theirs.set_nonblocking(true).unwrap();
    (ours, TcpStream::from_std(theirs))
}

#[test]
fn relay_idle_timeout_counts_from_the_last_byte_moved() {
    let (mut s, clock) = broker(config());
    let (mut x, xb) = pair();
    let (mut y, yb) = pair();
    s.start_relay(xb, yb, "x <-> y".to_owned(), [7; 16]);
    let rid = *s.relays.keys().next().expect("relay running");
    clock.advance(Duration::from_secs(59));
    s.timers();
    assert_eq!(s.relays.len(), 1);
    // A byte moves at 59 s: the idle time starts again.
    x.write_all(b"!").unwrap();
    let mut b = [0u8; 1];
    y.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..100 {
        s.pump_relay(rid);
        if s.relays[&rid].relay.bytes().0 == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    y.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"!");
    clock.advance(Duration::from_secs(59));
    s.timers();
    assert_eq!(s.relays.len(), 1, "reset 59 s after the last byte");
    clock.advance(Duration::from_secs(1));
    s.timers();
    assert!(s.relays.is_empty());
    assert_eq!(s.counters.relays_idle_closed, 1);
    assert_eq!(s.counters.relays_reset, 1);
    assert_reset(x);
    assert_reset(y);
}

#[test]
fn wildcard_bind_needs_an_advertised_ip_and_proxies_carry_the_advertised_one() {
    let mut cfg = config();
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    let err = Server::bind(cfg)
        .err()
        .expect("a wildcard without --advertise starts");
    assert!(err.to_string().contains("--advertise"), "{err}");

    let mut cfg = config();
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    cfg.advertise = Some("0.0.0.0".parse().unwrap());
    let err = Server::bind(cfg).err().expect("a wildcard advertised");
    assert!(err.to_string().contains("specific IP"), "{err}");

    // Bound on the wildcard, advertised as 192.0.2.7 (an address no interface holds, as
    // behind a 1:1 NAT): the proxy address is 192.0.2.7:PORT, its socket listens on
    // every local address.
    let mut cfg = config();
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    cfg.advertise = Some("192.0.2.7".parse().unwrap());
    let (mut s, _clock) = broker(cfg);
    assert!(s.local_addr().ip().is_unspecified());
    assert_eq!(s.advertised_addr().ip().to_string(), "192.0.2.7");
    assert_eq!(s.advertised_addr().port(), s.local_addr().port());
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    assert_eq!(proxy.ip().to_string(), "192.0.2.7");
    let local: SocketAddr = format!("127.0.0.1:{}", proxy.port()).parse().unwrap();
    StdStream::connect(local).expect("the proxy socket is bound on the wildcard");
}

/// `n` consecutive ports free for TCP and UDP on 127.0.0.1 (at the time of asking).
fn free_port_range(n: u16) -> super::config::PortRange {
    'next: for lo in (21_000u16..30_000).step_by(usize::from(n) + 7) {
        for p in lo..lo + n {
            let a: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
            if StdListener::bind(a).is_err() || std::net::UdpSocket::bind(a).is_err() {
                continue 'next;
            }
        }
        return super::config::PortRange { lo, hi: lo + n - 1 };
    }
    panic!("no {n} consecutive free ports");
}

#[test]
fn proxy_ports_come_from_the_range_and_an_exhausted_range_refuses_with_port_range() {
    let range = free_port_range(2);
    let mut cfg = config();
    cfg.proxy_ports = Some(range);
    let (mut s, clock) = broker(cfg);
    let a = register_tcp(&mut s, "10.1.0.5:9618");
    let b = register_tcp(&mut s, "10.1.0.5:9619");
    assert!(
        range.contains(a.port()) && range.contains(b.port()),
        "{a} {b} outside {range}"
    );
    assert_ne!(a, b);
    let third = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Udp,
            local: "10.1.0.5:9620".parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    );
    match &third {
        Body::Error { code, reason } => {
            assert_eq!(*code, gcb_proto::ErrorCode::PortRange);
            assert!(reason.contains(&range.to_string()), "{reason}");
        }
        other => panic!("third registration answered {other:?}"),
    }
    assert_eq!(s.counters.proxy_ports_exhausted, 1);
    // a's lease lapses: its port stays reserved for its owner (still refused to others)...
    let token_a = match s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: "10.1.0.5:9618".parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    ) {
        Body::Registered { token, .. } => token.expect("a token"),
        other => panic!("{other:?}"),
    };
    clock.advance(Duration::from_secs(20));
    let _ = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Heartbeat { proxies: vec![b] },
    );
    clock.advance(Duration::from_secs(16));
    s.timers();
    assert_eq!(s.registry.len(), 1, "a expired, b renewed");
    let other = register_tcp_result(&mut s, "10.1.0.6:9618", None, None);
    assert!(
        matches!(
            other,
            Body::Error {
                code: gcb_proto::ErrorCode::PortRange,
                ..
            }
        ),
        "{other:?}"
    );
    // ...and its owner gets it back with the proof.
    let proof = gcb_proto::token::to_hex(&gcb_proto::token::present(
        None,
        gcb_proto::token::Use::Ownership,
        &gcb_proto::token::from_hex(&token_a).expect("hex token"),
    ));
    let again = register_tcp_result(&mut s, "10.1.0.5:9618", Some(a), Some(proof));
    assert!(
        matches!(again, Body::Registered { proxy, .. } if proxy == a),
        "{again:?}"
    );
}

fn register_tcp_result(
    s: &mut Server,
    local: &str,
    previous_proxy: Option<SocketAddr>,
    previous_token: Option<String>,
) -> Body {
    s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: local.parse().unwrap(),
            previous_proxy,
            previous_token,
            punch: false,
        },
    )
}

#[test]
fn reconfigure_applies_limits_and_says_what_changed() {
    let (mut s, _clock) = broker(config());
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    let same = s.reconfigure(config());
    assert_eq!(same, super::Changes::default());
    let mut cfg = config();
    cfg.max_relays = 200;
    cfg.relay_idle = None;
    cfg.max_registrations_per_ip = 1;
    cfg.listen = "127.0.0.2:0".parse().unwrap();
    let ch = s.reconfigure(cfg);
    assert_eq!(
        ch.applied,
        [
            "max_registrations_per_ip 100->1",
            "max_relays 100->200",
            "relay_idle 60s->off"
        ]
    );
    assert_eq!(ch.need_restart, ["listen 127.0.0.1:0->127.0.0.2:0"]);
    // Lowered caps bind new registrations only: the first one stays.
    assert!(s.proxies.contains_key(&proxy));
    let reply = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: "10.1.0.5:9619".parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    );
    assert!(matches!(reply, Body::Error { .. }), "{reply:?}");
    assert_eq!(s.registry.len(), 1);
}

#[test]
fn draining_refuses_registrations_and_closes_the_proxies() {
    use std::sync::atomic::Ordering;
    let (mut s, clock) = broker(config());
    let proxy = register_tcp(&mut s, "10.1.0.5:9618");
    let signals = super::Signals::default();
    signals.terminate.store(1, Ordering::Relaxed);
    // No relay open: the drain is over at once.
    assert_eq!(s.on_signals(&signals), Some(super::RunEnd::Exit));
    assert!(s.draining());
    assert!(s.proxies.is_empty() && s.relay_listener.is_none());
    assert!(StdStream::connect(proxy).is_err(), "proxy still accepts");
    let reply = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: "10.1.0.5:9619".parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    );
    assert!(
        matches!(&reply, Body::Error { code: ErrorCode::Busy, reason } if reason.contains("shutting down")),
        "{reply:?}"
    );
    // Heartbeats of registered listeners are still answered.
    clock.advance(Duration::from_secs(1));
    let ack = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Heartbeat {
            proxies: vec![proxy],
        },
    );
    assert!(matches!(ack, Body::HeartbeatAck { .. }), "{ack:?}");
}

/// A `connect_request` from another public IP for `proxy`, asking to punch or not.
fn connect_request(s: &mut Server, proxy: SocketAddr, punch: bool) -> Body {
    s.on_request(
        "127.0.0.2:40001".parse().unwrap(),
        Body::ConnectRequest {
            proxy,
            transport: Transport::Tcp,
            connector_local: "10.2.0.7:0".parse().unwrap(),
            connector_listen: None,
            punch,
        },
    )
}

#[test]
fn punch_is_decided_for_keyed_punch_capable_pairs_and_skipped_after_a_failure() {
    use gcb_proto::Route;
    let key =
        gcb_proto::auth::PoolKey::from_file_contents(b"0123456789abcdef0123456789abcdef").unwrap();
    // Unkeyed: punch messages could not be authenticated, so never a punch.
    let (mut s, _clock) = broker(config());
    let reply = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: "10.1.0.5:9618".parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: true,
        },
    );
    let Body::Registered { proxy, .. } = reply else {
        panic!("{reply:?}")
    };
    assert!(matches!(
        connect_request(&mut s, proxy, true),
        Body::ConnectDecision {
            route: Route::Relay { .. }
        }
    ));

    let mut cfg = config();
    cfg.key = Some(key);
    let (mut s, clock) = broker(cfg);
    let reg = |s: &mut Server, local: &str, punch: bool| match s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: local.parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch,
        },
    ) {
        Body::Registered { proxy, .. } => proxy,
        other => panic!("{other:?}"),
    };
    let old_shim = reg(&mut s, "10.1.0.5:9000", false);
    let punching = reg(&mut s, "10.1.0.5:9001", true);
    // A listener whose shim does not punch, or a connector that does not: relay.
    assert!(matches!(
        connect_request(&mut s, old_shim, true),
        Body::ConnectDecision {
            route: Route::Relay { .. }
        }
    ));
    assert!(matches!(
        connect_request(&mut s, punching, false),
        Body::ConnectDecision {
            route: Route::Relay { .. }
        }
    ));
    assert!(matches!(
        connect_request(&mut s, punching, true),
        Body::ConnectDecision {
            route: Route::Punch { .. }
        }
    ));
    // After a failure between the two IPs: relay at once, counted, for FAILED_FOR.
    let now = s.now().mono;
    s.punch_memo.failed(
        "127.0.0.1".parse().unwrap(),
        "127.0.0.2".parse().unwrap(),
        now,
    );
    assert!(matches!(
        connect_request(&mut s, punching, true),
        Body::ConnectDecision {
            route: Route::Relay { .. }
        }
    ));
    assert_eq!(s.counters.punch_skipped, 1);
    clock.advance(crate::punchmemo::FAILED_FOR);
    assert!(matches!(
        connect_request(&mut s, punching, true),
        Body::ConnectDecision {
            route: Route::Punch { .. }
        }
    ));
}

#[test]
fn tcp_proxies_overflow_to_the_next_proxy_ip_and_their_owner_gets_them_back() {
    let range = free_port_range(2);
    let mut cfg = config();
    cfg.proxy_ports = Some(range);
    cfg.proxy_ips = vec!["127.0.0.2".parse().unwrap()];
    let (mut s, _clock) = broker(cfg);
    let first: Vec<SocketAddr> = (0..2)
        .map(|i| register_tcp(&mut s, &format!("10.1.0.5:{}", 9000 + i)))
        .collect();
    let second: Vec<SocketAddr> = (2..4)
        .map(|i| register_tcp(&mut s, &format!("10.1.0.5:{}", 9000 + i)))
        .collect();
    for p in &first {
        assert_eq!(p.ip().to_string(), "127.0.0.1", "{first:?}");
    }
    for p in &second {
        assert_eq!(p.ip().to_string(), "127.0.0.2", "{second:?}");
        assert!(range.contains(p.port()), "{p} outside {range}");
        StdStream::connect(p).expect("the proxy listens on the extra IP");
    }
    // Both IPs full: refused; a UDP registration never goes to the extra IP.
    for transport in [Transport::Tcp, Transport::Udp] {
        let r = s.on_request(
            CLIENT.parse().unwrap(),
            Body::Register {
                transport,
                local: "10.1.0.5:9100".parse().unwrap(),
                previous_proxy: None,
                previous_token: None,
                punch: false,
            },
        );
        assert!(
            matches!(
                r,
                Body::Error {
                    code: gcb_proto::ErrorCode::PortRange,
                    ..
                }
            ),
            "{transport:?}: {r:?}"
        );
    }
    // The owner of a proxy on the extra IP gets it back (as after a broker restart:
    // `previous_proxy` with the ownership proof), though its port is reserved.
    let token = match s.on_request(
        CLIENT.parse().unwrap(),
        Body::Register {
            transport: Transport::Tcp,
            local: "10.1.0.5:9002".parse().unwrap(),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    ) {
        Body::Registered { token, proxy, .. } => {
            assert_eq!(proxy, second[0], "idempotent");
            token.expect("a token")
        }
        other => panic!("{other:?}"),
    };
    let proof = gcb_proto::token::to_hex(&gcb_proto::token::present(
        None,
        gcb_proto::token::Use::Ownership,
        &gcb_proto::token::from_hex(&token).expect("hex token"),
    ));
    let gone = s.on_request(
        CLIENT.parse().unwrap(),
        Body::Unregister {
            proxy: second[0],
            transport: Some(Transport::Tcp),
            token: Some(proof.clone()),
        },
    );
    assert!(matches!(gone, Body::Ack {}), "{gone:?}");
    let again = register_tcp_result(&mut s, "10.1.0.5:9002", Some(second[0]), Some(proof));
    assert!(
        matches!(again, Body::Registered { proxy, .. } if proxy == second[0]),
        "{again:?}"
    );
}
