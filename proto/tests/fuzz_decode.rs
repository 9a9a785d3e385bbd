//! Property tests: untrusted bytes never panic the decoder, the auth layer or
//! the endpoint, and well-formed messages roundtrip.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use gcb_proto::{
    auth::Sealer, Body, Config, ConnectId, Endpoint, Envelope, Event, Now, PoolKey, Route,
    Transport,
};
use proptest::prelude::*;

const UNIX: u64 = 1_700_000_000_000;

fn key() -> PoolKey {
    PoolKey::from_file_contents(b"fuzz-pool-key-0123456789").unwrap()
}

fn now(base: Instant) -> Now {
    Now {
        mono: base,
        unix_ms: UNIX,
    }
}

fn peer() -> SocketAddr {
    "10.1.0.5:4000".parse().unwrap()
}

/// One envelope of most kinds ([`SAMPLES`] of them), for mutation.
fn samples() -> Vec<Envelope> {
    let a: SocketAddr = "203.0.113.10:40001".parse().unwrap();
    let id = ConnectId::from_bytes([7; 16]);
    vec![
        Envelope::request(
            1,
            Body::Register {
                transport: Transport::Tcp,
                local: peer(),
                previous_proxy: Some(a),
                previous_token: None,
                punch: false,
            },
        ),
        Envelope::response(
            2,
            1,
            Body::Registered {
                proxy: a,
                lease_ms: 60_000,
                token: Some("0123456789abcdef0123456789abcdef".into()),
            },
        ),
        Envelope::request(
            3,
            Body::Heartbeat {
                proxies: vec![a, peer()],
            },
        ),
        Envelope::request(
            4,
            Body::ConnectRequest {
                proxy: a,
                transport: Transport::Udp,
                connector_local: peer(),
                connector_listen: Some(peer()),
                punch: false,
            },
        ),
        Envelope::response(
            5,
            4,
            Body::ConnectDecision {
                route: Route::Relay {
                    addr: a,
                    connect_id: id,
                },
            },
        ),
        Envelope::request(
            6,
            Body::ConnectBack {
                connect_id: id,
                dial: a,
                proxy: a,
                logical_peer: peer(),
            },
        ),
        Envelope::request(
            7,
            Body::Forward {
                transport: Transport::Tcp,
                private: peer(),
                desired_public_port: Some(80),
                probe_port: 41000,
            },
        ),
        Envelope::response(
            8,
            7,
            Body::QueryResult {
                private: None,
                epoch: 9,
                public_ip: Some("203.0.113.1".parse().unwrap()),
            },
        ),
        Envelope::response(9, 3, Body::error(gcb_proto::ErrorCode::Quota, "full")),
        Envelope::request(
            10,
            Body::PunchEnd {
                proxy: a,
                peer: SocketAddrV4::new([203, 0, 113, 2].into(), 9100),
                peer_proxy: SocketAddrV4::new([203, 0, 113, 10].into(), 40002),
            },
        ),
    ]
}

/// How many [`samples`] there are.
const SAMPLES: usize = 10;

/// A mutation applied to a valid byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..8),
                Just(b"\"".to_vec()),
                Just(b"{".to_vec()),
                Just(b",\"x\":null".to_vec()),
                Just(b"99999999999999999999999".to_vec()),
            ]
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = b.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if !b.is_empty() {
                    let i = i % b.len();
                    b[i] ^= x;
                }
            }
            Mutation::Truncate(i) => b.truncate(i % len),
            Mutation::Insert(i, v) => {
                let i = i % (b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Mutation::Remove(i, n) => {
                if !b.is_empty() {
                    let i = i % b.len();
                    let end = (i + n).min(b.len());
                    b.drain(i..end);
                }
            }
        }
    }
    b
}

/// JSON-shaped noise that gets past the envelope parser into body decoding.
fn jsonish() -> impl Strategy<Value = String> {
    let ty = prop_oneof![
        Just("register"),
        Just("registered"),
        Just("heartbeat"),
        Just("connect_request"),
        Just("connect_decision"),
        Just("connect_back"),
        Just("forward"),
        Just("query_result"),
        Just("punch_end"),
        Just("error"),
        Just("ack"),
        Just("zzz"),
    ];
    let val = prop_oneof![
        Just("null".to_string()),
        Just("\"tcp\"".to_string()),
        Just("\"1.2.3.4:5\"".to_string()),
        Just("\"[::1]:65535\"".to_string()),
        Just("\"0707070707070707070707070707070g\"".to_string()),
        Just(
            "{\"kind\":\"reverse\",\"connect_id\":\"07070707070707070707070707070707\"}"
                .to_string()
        ),
        Just("[\"1.2.3.4:5\"]".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z:0-9.\\[\\]]{0,20}".prop_map(|s| format!("\"{s}\"")),
    ];
    let field = prop_oneof![
        Just("transport"),
        Just("local"),
        Just("proxy"),
        Just("proxies"),
        Just("route"),
        Just("connect_id"),
        Just("private"),
        Just("probe_port"),
        Just("code"),
        Just("reason"),
        Just("lease_ms"),
        Just("epoch"),
        Just("peer"),
        Just("peer_proxy"),
        Just("other"),
    ];
    (
        0u64..4,
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        ty,
        proptest::collection::vec((field, val), 0..6),
    )
        .prop_map(|(v, id, re, ty, fields)| {
            let mut s = format!("{{\"v\":{v},\"id\":{id},");
            if let Some(re) = re {
                s += &format!("\"re\":{re},");
            }
            s += &format!("\"body\":{{\"type\":\"{ty}\"");
            for (f, v) in fields {
                s += &format!(",\"{f}\":{v}");
            }
            s + "}}"
        })
}

/// Feeds bytes to a fresh endpoint and drains it; checks basic invariants.
fn feed(keyed: bool, bytes: &[u8]) {
    let base = Instant::now();
    let mut ep = Endpoint::new(Config::default(), keyed.then(key), 77);
    ep.handle_datagram(now(base), peer(), bytes);
    ep.handle_timeout(Now {
        mono: base + Duration::from_secs(60),
        unix_ms: UNIX + 60_000,
    });
    let mut n_tx = 0;
    while let Some(tx) = ep.poll_transmit() {
        assert!(tx.payload.len() <= gcb_proto::MAX_DATAGRAM);
        assert_eq!(tx.to, peer());
        n_tx += 1;
    }
    assert!(n_tx <= 1);
    while let Some(ev) = ep.poll_event() {
        // only requests can appear: we sent nothing
        assert!(matches!(ev, Event::Request { .. }), "{ev:?}");
    }
    let st = ep.stats();
    assert_eq!(st.received, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decode_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        let _ = Envelope::decode(&bytes);
    }

    #[test]
    fn decode_jsonish(s in jsonish()) {
        if let Ok(env) = Envelope::decode(s.as_bytes()) {
            // anything accepted re-encodes and decodes to the same value
            let again = Envelope::decode(&env.encode().unwrap()).unwrap();
            prop_assert_eq!(again, env);
        }
        feed(false, &Sealer::new(None, 1).seal(UNIX, s.as_bytes()));
    }

    #[test]
    fn decode_mutated_envelopes(i in 0..SAMPLES, ms in proptest::collection::vec(mutation(), 1..4)) {
        let json = samples()[i].encode().unwrap();
        let _ = Envelope::decode(&apply(json, &ms));
    }

    #[test]
    fn endpoint_arbitrary_bytes(keyed in any::<bool>(), bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        feed(keyed, &bytes);
        // also with a valid header in front, so the payload reaches deeper
        let mut framed = b"GCB1\x00".to_vec();
        framed.extend_from_slice(&bytes);
        feed(keyed, &framed);
    }

    #[test]
    fn endpoint_mutated_frames(
        keyed in any::<bool>(),
        i in 0..SAMPLES,
        ms in proptest::collection::vec(mutation(), 0..4),
    ) {
        let json = samples()[i].encode().unwrap();
        let frame = Sealer::new(keyed.then(key), 5).seal(UNIX, &json);
        feed(keyed, &apply(frame, &ms));
    }

    #[test]
    fn roundtrip_generated(
        ip in any::<[u8; 4]>(), port in any::<u16>(), id in any::<[u8; 16]>(),
        msg_id in any::<u64>(), re in proptest::option::of(any::<u64>()),
        reason in "\\PC{0,40}",
    ) {
        let a = SocketAddr::from((ip, port));
        let cid = ConnectId::from_bytes(id);
        prop_assert_eq!(ConnectId::parse(&cid.to_string()).unwrap(), cid);
        for body in [
            Body::ConnectBack { connect_id: cid, dial: a, proxy: a, logical_peer: a },
            Body::ConnectDecision { route: Route::Reverse { connect_id: cid } },
            Body::Deleted { epoch: msg_id },
            Body::error(gcb_proto::ErrorCode::Internal, reason.clone()),
        ] {
            let env = Envelope { v: 1, id: msg_id, re, body };
            prop_assert_eq!(Envelope::decode(&env.encode().unwrap()).unwrap(), env);
        }
    }
}

#[test]
fn every_sample_is_mutated() {
    assert_eq!(samples().len(), SAMPLES);
}
