//! Unit tests of [`super`].
use super::*;
use crate::auth::PoolKey;
use crate::msg::Transport;

const A: &str = "10.1.0.5:4000";
const B: &str = "203.0.113.10:9618";
const C: &str = "203.0.113.66:9618";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Clock {
    base: Instant,
    ms: u64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            base: Instant::now(),
            ms: 0,
        }
    }
    fn now(&self) -> Now {
        Now {
            mono: self.base + Duration::from_millis(self.ms),
            unix_ms: 1_700_000_000_000 + self.ms,
        }
    }
    fn at(&self, t: Instant) -> Now {
        let ms = (t - self.base).as_millis() as u64;
        Now {
            mono: t,
            unix_ms: 1_700_000_000_000 + ms,
        }
    }
}

fn key() -> Option<PoolKey> {
    Some(PoolKey::from_file_contents(b"pool-key-for-unit-tests").unwrap())
}

fn body() -> Body {
    Body::Register {
        transport: Transport::Tcp,
        local: addr(A),
        previous_proxy: None,
        previous_token: None,
        punch: false,
    }
}

fn drain(ep: &mut Endpoint) -> Vec<Transmit> {
    std::iter::from_fn(|| ep.poll_transmit()).collect()
}

fn events(ep: &mut Endpoint) -> Vec<Event> {
    std::iter::from_fn(|| ep.poll_event()).collect()
}

fn big_reply() -> Body {
    Body::Registered {
        proxy: addr(B),
        lease_ms: 35_000,
        token: Some("0123456789abcdef0123456789abcdef".into()),
    }
}

#[test]
fn unkeyed_replies_never_exceed_the_request() {
    let clk = Clock::new();
    let mut b = Endpoint::new(Config::default(), None, 2);
    // A minimal hand-made (unpadded) request from a spoofable source.
    let tiny = b"GCB1\x00{\"v\":1,\"id\":7,\"body\":{\"type\":\"heartbeat\",\"proxies\":[]}}";
    b.handle_datagram(clk.now(), addr(A), tiny);
    let Event::Request { from, id, .. } = events(&mut b).remove(0) else {
        panic!("expected a request")
    };
    b.respond(clk.now(), from, id, big_reply()).unwrap();
    let out = drain(&mut b);
    assert!(out.iter().all(|t| t.payload.len() <= tiny.len()), "{out:?}");
    assert_eq!(b.stats().replies_shrunk + b.stats().replies_withheld, 1);
    // A duplicate is answered from the cache under the same rule.
    b.handle_datagram(clk.now(), addr(A), tiny);
    assert!(drain(&mut b).iter().all(|t| t.payload.len() <= tiny.len()));
    // A shorter datagram than the minimal error gets nothing at all.
    let mini = b"GCB1\x00{\"v\":1,\"id\":8,\"body\":{\"type\":\"ack\"}}";
    b.handle_datagram(clk.now(), addr(A), mini);
    assert!(
        drain(&mut b).is_empty(),
        "an ack is no request we answer big"
    );
    // An undecodable request's error reply obeys it too.
    let bad = b"GCB1\x00{\"v\":1,\"id\":9,\"body\":{\"type\":\"nonsense_type_x\"}}";
    b.handle_datagram(clk.now(), addr(A), bad);
    assert!(drain(&mut b).iter().all(|t| t.payload.len() <= bad.len()));
}

#[test]
fn unkeyed_requests_are_padded_so_honest_replies_fit() {
    let clk = Clock::new();
    let mut a = Endpoint::new(Config::default(), None, 1);
    let mut b = Endpoint::new(Config::default(), None, 2);
    a.send_request(clk.now(), addr(B), body()).unwrap();
    let req = drain(&mut a).remove(0);
    assert_eq!(req.payload.len(), UNKEYED_REQUEST_MIN);
    b.handle_datagram(clk.now(), addr(A), &req.payload);
    let Event::Request {
        from,
        id,
        body: got,
    } = events(&mut b).remove(0)
    else {
        panic!("expected a request")
    };
    assert_eq!(got, body(), "padding is invisible to the receiver");
    b.respond(clk.now(), from, id, big_reply()).unwrap();
    let rep = drain(&mut b).remove(0);
    a.handle_datagram(clk.now(), addr(B), &rep.payload);
    assert!(
        matches!(&events(&mut a)[..], [Event::Response { body, .. }] if *body == big_reply()),
        "the full reply arrives"
    );
    assert_eq!(b.stats().replies_shrunk + b.stats().replies_withheld, 0);
    // Keyed: no padding, no limit.
    let mut ka = Endpoint::new(Config::default(), key(), 3);
    ka.send_request(clk.now(), addr(B), body()).unwrap();
    assert!(drain(&mut ka)[0].payload.len() < UNKEYED_REQUEST_MIN);
}

#[test]
fn keyed_frames_from_before_the_start_are_refused() {
    let clk = Clock::new();
    let mut a = Endpoint::new(Config::default(), key(), 1);
    a.send_request(clk.now(), addr(B), body()).unwrap();
    let captured = drain(&mut a).remove(0);
    // The receiver restarts 2 s later: the captured frame is inside the clock
    // window and its nonce is unknown to the new process, but it predates the start.
    let mut later = clk.now();
    later.unix_ms += 2_000;
    let mut b = Endpoint::new(Config::default(), key(), 2);
    b.set_not_before(later.unix_ms);
    b.handle_datagram(later, addr(A), &captured.payload);
    assert!(events(&mut b).is_empty());
    assert_eq!(b.stats().rejected(RejectReason::StaleTimestamp), 1);
    // A fresh frame from the same sender is accepted.
    let mut a2 = Endpoint::new(Config::default(), key(), 3);
    a2.send_request(later, addr(B), body()).unwrap();
    b.handle_datagram(later, addr(A), &drain(&mut a2)[0].payload);
    assert_eq!(events(&mut b).len(), 1);
}

#[test]
fn request_timeout_ignores_the_reply_cache() {
    let clk = Clock::new();
    let mut a = Endpoint::new(Config::default(), None, 1);
    let mut b = Endpoint::new(Config::default(), None, 2);
    assert_eq!(a.poll_request_timeout(), None);
    a.send_request(clk.now(), addr(B), body()).unwrap();
    let t = a
        .poll_request_timeout()
        .expect("a retransmission is scheduled");
    assert_eq!(a.poll_timeout(), Some(t));
    let tx = drain(&mut a);
    b.handle_datagram(clk.now(), addr(A), &tx[0].payload);
    let Some(Event::Request { id, .. }) = b.poll_event() else {
        panic!("no request")
    };
    b.respond(clk.now(), addr(A), id, Body::Ack {}).unwrap();
    // The cached reply expires later: poll_timeout says so, the request timer not.
    assert!(b.poll_timeout().is_some());
    assert_eq!(b.poll_request_timeout(), None);
}

#[test]
fn request_response_once_with_cached_duplicates() {
    for k in [None, key()] {
        let clk = Clock::new();
        let mut a = Endpoint::new(Config::default(), k.clone(), 1);
        let mut b = Endpoint::new(Config::default(), k.clone(), 2);
        let rid = a.send_request(clk.now(), addr(B), body()).unwrap();
        let tx = drain(&mut a);
        assert_eq!(tx.len(), 1);
        assert_eq!(tx[0].to, addr(B));
        b.handle_datagram(clk.now(), addr(A), &tx[0].payload);
        let ev = events(&mut b);
        let [Event::Request {
            from,
            id,
            body: got,
        }] = &ev[..]
        else {
            panic!("{ev:?}")
        };
        assert_eq!((*from, got), (addr(A), &body()));
        // duplicate before respond: dropped silently (unkeyed) or by replay (keyed)
        b.handle_datagram(clk.now(), addr(A), &tx[0].payload);
        assert!(events(&mut b).is_empty());
        assert!(drain(&mut b).is_empty());
        let reply = Body::Registered {
            proxy: addr(B),
            lease_ms: 1,
            token: None,
        };
        b.respond(clk.now(), addr(A), *id, reply.clone()).unwrap();
        let r = drain(&mut b);
        assert_eq!(r.len(), 1);
        // a retransmission of the request is answered from cache, not surfaced
        let mut a_clk = clk.now();
        a_clk.mono += Duration::from_millis(200);
        a.handle_timeout(a_clk);
        let re = drain(&mut a);
        assert_eq!(re.len(), 1);
        // same message id and JSON; keyed frames get a fresh nonce
        assert_eq!(re[0].payload == tx[0].payload, k.is_none());
        b.handle_datagram(clk.now(), addr(A), &re[0].payload);
        assert!(events(&mut b).is_empty());
        let r2 = drain(&mut b);
        assert_eq!(r2.len(), 1);
        assert_eq!(b.stats().duplicates_answered_from_cache, 1);
        if k.is_none() {
            assert_eq!(b.stats().duplicates_pending, 1);
            assert_eq!(r2[0].payload, r[0].payload);
        } else {
            assert_eq!(b.stats().rejected(RejectReason::Replayed), 1);
        }
        // response from a wrong peer is ignored
        // (uses the second copy: in keyed mode the nonce of a frame is
        // consumed on first acceptance, whoever it came from)
        a.handle_datagram(clk.now(), addr(C), &r2[0].payload);
        assert_eq!(a.stats().wrong_peer_responses, 1);
        assert!(events(&mut a).is_empty());
        a.handle_datagram(clk.now(), addr(B), &r[0].payload);
        assert_eq!(
            events(&mut a),
            vec![Event::Response {
                from: addr(B),
                request: rid,
                body: reply
            }]
        );
        a.handle_datagram(clk.now(), addr(B), &r2[0].payload);
        a.handle_datagram(clk.now(), addr(B), &r[0].payload);
        assert!(events(&mut a).is_empty());
        if k.is_none() {
            assert_eq!(a.stats().unmatched_responses, 2);
        } else {
            assert_eq!(a.stats().rejected(RejectReason::Replayed), 2);
        }
        assert_eq!(a.outstanding(), 0);
        assert_eq!(a.poll_timeout(), None);
    }
}

#[test]
fn backoff_schedule_and_single_timeout() {
    let clk = Clock::new();
    let mut a = Endpoint::new(Config::default(), None, 1);
    let rid = a.send_request(clk.now(), addr(B), body()).unwrap();
    let mut tx_times = vec![0u64];
    drain(&mut a);
    let mut timeouts = vec![];
    while let Some(t) = a.poll_timeout() {
        a.handle_timeout(clk.at(t));
        let ms = (t - clk.base).as_millis() as u64;
        if !drain(&mut a).is_empty() {
            tx_times.push(ms);
        }
        for e in events(&mut a) {
            timeouts.push((ms, e));
        }
    }
    assert_eq!(
        tx_times,
        vec![0, 200, 600, 1400, 3000, 5000, 7000, 9000],
        "200ms doubling to 2s"
    );
    assert_eq!(
        timeouts,
        vec![(
            10_000,
            Event::Timeout {
                to: addr(B),
                request: rid
            }
        )]
    );
    assert_eq!(a.stats().timeouts, 1);
    assert_eq!(a.stats().retransmits, 7);
}

#[test]
fn cancel_stops_everything() {
    let clk = Clock::new();
    let mut a = Endpoint::new(Config::default(), None, 1);
    let rid = a.send_request(clk.now(), addr(B), body()).unwrap();
    a.cancel(rid);
    assert_eq!(a.poll_timeout(), None);
    assert_eq!(a.outstanding(), 0);
}

#[test]
fn caps_refuse() {
    let clk = Clock::new();
    let cfg = Config {
        max_outstanding: 2,
        max_cache_entries: 1,
        ..Config::default()
    };
    let mut a = Endpoint::new(cfg.clone(), None, 1);
    a.send_request(clk.now(), addr(B), body()).unwrap();
    a.send_request(clk.now(), addr(B), body()).unwrap();
    assert!(matches!(
        a.send_request(clk.now(), addr(B), body()),
        Err(SendError::TooManyOutstanding)
    ));
    let tx = drain(&mut a);
    let mut b = Endpoint::new(cfg, None, 2);
    b.handle_datagram(clk.now(), addr(A), &tx[0].payload);
    b.handle_datagram(clk.now(), addr(A), &tx[1].payload);
    assert_eq!(events(&mut b).len(), 1);
    assert_eq!(b.stats().busy_refusals, 1);
    let busy = drain(&mut b);
    a.handle_datagram(clk.now(), addr(B), &busy[0].payload);
    assert!(matches!(
        &events(&mut a)[..],
        [Event::Response {
            body: Body::Error {
                code: ErrorCode::Busy,
                ..
            },
            ..
        }]
    ));
    // respond to something unknown while full
    assert!(matches!(
        b.respond(clk.now(), addr(C), RequestId(5), Body::Ack {}),
        Err(SendError::CacheFull)
    ));
    // too large
    let huge = Body::Error {
        code: ErrorCode::Internal,
        reason: "x".repeat(2000),
    };
    assert!(matches!(
        a.send_request(clk.now(), addr(C), huge),
        Err(SendError::TooManyOutstanding) | Err(SendError::Encode(_))
    ));
}

#[test]
fn cache_expires() {
    let clk = Clock::new();
    let mut a = Endpoint::new(Config::default(), None, 1);
    let mut b = Endpoint::new(Config::default(), None, 2);
    a.send_request(clk.now(), addr(B), body()).unwrap();
    let tx = drain(&mut a);
    b.handle_datagram(clk.now(), addr(A), &tx[0].payload);
    let Some(Event::Request { id, .. }) = b.poll_event() else {
        panic!()
    };
    b.respond(clk.now(), addr(A), id, Body::Ack {}).unwrap();
    assert_eq!(b.cached(), 1);
    let t = b.poll_timeout().unwrap();
    assert_eq!(t, clk.now().mono + Duration::from_secs(30));
    b.handle_timeout(clk.at(t));
    assert_eq!(b.cached(), 0);
    assert_eq!(b.poll_timeout(), None);
}

/// An unkeyed frame padded like an honest peer's request (module docs).
fn raw_frame(json: &str) -> Vec<u8> {
    let padded = format!(
        "{json:<width$}",
        width = UNKEYED_REQUEST_MIN - UNKEYED_OVERHEAD
    );
    crate::auth::Sealer::new(None, 9).seal(0, padded.as_bytes())
}

#[test]
fn auto_error_replies_and_synthesized_errors() {
    let clk = Clock::new();
    let mut b = Endpoint::new(Config::default(), None, 2);
    let cases = [
        (
            r#"{"v":2,"id":11,"body":{"type":"ack"}}"#,
            ErrorCode::Version,
        ),
        (
            r#"{"v":1,"id":12,"body":{"type":"teleport"}}"#,
            ErrorCode::Unsupported,
        ),
        (
            r#"{"v":1,"id":13,"body":{"type":"register"}}"#,
            ErrorCode::BadRequest,
        ),
    ];
    for (j, code) in cases {
        b.handle_datagram(clk.now(), addr(A), &raw_frame(j));
        assert!(events(&mut b).is_empty());
        let tx = drain(&mut b);
        assert_eq!(tx.len(), 1);
        let env = Envelope::decode(&tx[0].payload[5..]).unwrap();
        let want_re: u64 = serde_json::from_str::<serde_json::Value>(j).unwrap()["id"]
            .as_u64()
            .unwrap();
        assert_eq!(env.re, Some(want_re));
        assert!(matches!(env.body, Body::Error { code: c, .. } if c == code));
        // duplicate: answered from cache
        b.handle_datagram(clk.now(), addr(A), &raw_frame(j));
        assert_eq!(drain(&mut b).len(), 1);
    }
    assert_eq!(b.stats().error_replies, 3);
    assert_eq!(b.stats().duplicates_answered_from_cache, 3);
    b.handle_datagram(clk.now(), addr(A), &raw_frame("garbage"));
    b.handle_datagram(clk.now(), addr(A), b"not even a frame");
    assert_eq!(b.stats().malformed, 1);
    assert_eq!(b.stats().rejected(RejectReason::NotAFrame), 1);
    assert!(drain(&mut b).is_empty());

    // an undecodable response completes the request with a local error
    let mut a = Endpoint::new(Config::default(), None, 1);
    let rid = a.send_request(clk.now(), addr(B), body()).unwrap();
    let j = format!(
        r#"{{"v":1,"id":5,"re":{},"body":{{"type":"registered_v2"}}}}"#,
        rid.0
    );
    a.handle_datagram(clk.now(), addr(B), &raw_frame(&j));
    assert!(matches!(
        &events(&mut a)[..],
        [Event::Response { request, body: Body::Error { code: ErrorCode::Unsupported, .. }, .. }] if *request == rid
    ));
    assert_eq!(a.outstanding(), 0);
}

#[test]
fn ids_depend_on_session() {
    let clk = Clock::new();
    let mut a1 = Endpoint::new(Config::default(), None, 1);
    let mut a2 = Endpoint::new(Config::default(), None, 2);
    let r1 = a1.send_request(clk.now(), addr(B), body()).unwrap();
    let r2 = a2.send_request(clk.now(), addr(B), body()).unwrap();
    assert_ne!(r1, r2);
    assert!(r1.0 < (1 << 53) && r2.0 < (1 << 53));
}

#[test]
fn ticker() {
    let t0 = Instant::now();
    let mut t = Ticker::new(HEARTBEAT_INTERVAL);
    assert!(t.poll(t0));
    assert!(!t.poll(t0 + Duration::from_secs(9)));
    assert_eq!(t.next_due(), Some(t0 + HEARTBEAT_INTERVAL));
    assert!(t.poll(t0 + Duration::from_secs(25)));
    assert_eq!(t.next_due(), Some(t0 + Duration::from_secs(35)));
    t.reset(t0 + Duration::from_secs(30));
    assert!(!t.poll(t0 + Duration::from_secs(35)));
}

#[test]
fn ticker_spread_stays_within_a_tenth_of_the_interval() {
    let now = Instant::now();
    let iv = Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    for r in [
        0u64,
        1,
        499_999,
        500_000,
        999_999,
        1_000_000,
        u64::MAX,
        123_456_789,
    ] {
        let mut t = Ticker::new(iv);
        assert!(t.poll_spread(now, r), "due at once");
        let next = t.next_due().unwrap() - now;
        assert!(
            next >= iv - iv / 10 && next <= iv + iv / 10,
            "{r}: {next:?}"
        );
        assert!(!t.poll_spread(now + iv / 2, r), "not due before it");
        seen.insert(next);
    }
    assert!(
        seen.len() > 3,
        "the random number places the tick: {seen:?}"
    );
}
