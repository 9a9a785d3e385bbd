//! Unit tests of [`super`].
use super::*;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn cid() -> ConnectId {
    ConnectId::from_bytes([
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ])
}

/// One of every body variant (and every route kind).
pub(crate) fn all_bodies() -> Vec<Body> {
    vec![
        Body::Register {
            transport: Transport::Tcp,
            local: a("10.1.0.5:9618"),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
        Body::Register {
            transport: Transport::Tcp,
            local: a("10.1.0.5:9618"),
            previous_proxy: Some(a("203.0.113.10:40001")),
            previous_token: None,
            punch: false,
        },
        Body::Registered {
            proxy: a("203.0.113.10:40001"),
            lease_ms: 60_000,
            token: None,
        },
        Body::Registered {
            proxy: a("203.0.113.10:40002"),
            lease_ms: 60_000,
            token: Some("00112233445566778899aabbccddeeff".into()),
        },
        Body::Unregister {
            proxy: a("203.0.113.10:40001"),
            transport: None,
            token: None,
        },
        Body::Unregister {
            proxy: a("203.0.113.10:40001"),
            transport: Some(Transport::Udp),
            token: None,
        },
        Body::Heartbeat {
            proxies: vec![a("203.0.113.10:40001"), a("[2001:db8::1]:7")],
        },
        Body::HeartbeatAck { unknown: vec![] },
        Body::ReregisterRequest {},
        Body::ConnectRequest {
            proxy: a("203.0.113.10:40001"),
            transport: Transport::Udp,
            connector_local: a("10.2.0.7:5000"),
            connector_listen: Some(a("10.2.0.7:5001")),
            punch: false,
        },
        Body::ConnectRequest {
            proxy: a("203.0.113.10:40001"),
            transport: Transport::Tcp,
            connector_local: a("10.2.0.7:5000"),
            connector_listen: None,
            punch: false,
        },
        Body::ConnectDecision {
            route: Route::Direct {
                addr: a("203.0.113.20:80"),
            },
        },
        Body::ConnectDecision {
            route: Route::Reverse { connect_id: cid() },
        },
        Body::ConnectDecision {
            route: Route::Relay {
                addr: a("203.0.113.10:9001"),
                connect_id: cid(),
            },
        },
        Body::ConnectBack {
            connect_id: cid(),
            dial: a("203.0.113.10:9001"),
            proxy: a("203.0.113.10:40001"),
            logical_peer: a("203.0.113.2:33000"),
        },
        Body::PunchRequest {
            proxy: a("203.0.113.10:40001"),
            from_proxy: a("203.0.113.10:40002"),
            token: "00112233445566778899aabbccddeeff".into(),
        },
        Body::Punch {
            peer: v4("203.0.113.1:9000"),
            peer_local: None,
            me: v4("203.0.113.2:9000"),
            nonce: "00112233445566778899aabbccddeeff".into(),
        },
        Body::Punch {
            peer: v4("203.0.113.1:9000"),
            peer_local: Some(v4("10.1.0.12:9000")),
            me: v4("203.0.113.1:9001"),
            nonce: "00112233445566778899aabbccddeeff".into(),
        },
        Body::PunchBack {
            proxy: a("203.0.113.10:40001"),
            peer: v4("203.0.113.2:9000"),
            peer_local: None,
            nonce: "00112233445566778899aabbccddeeff".into(),
        },
        Body::PunchEnd {
            proxy: a("203.0.113.10:40001"),
            peer: v4("203.0.113.2:9000"),
            peer_proxy: v4("203.0.113.10:40002"),
        },
        Body::Forward {
            transport: Transport::Tcp,
            private: a("10.1.0.5:8080"),
            desired_public_port: Some(8080),
            probe_port: 41000,
        },
        Body::Forward {
            transport: Transport::Udp,
            private: a("10.1.0.5:8080"),
            desired_public_port: None,
            probe_port: 41000,
        },
        Body::Forwarded {
            public: a("203.0.113.1:20000"),
            epoch: 3,
        },
        Body::Delete {
            transport: Transport::Tcp,
            private: a("10.1.0.5:8080"),
        },
        Body::Deleted { epoch: 4 },
        Body::Query {
            transport: Transport::Tcp,
            public: a("203.0.113.1:20000"),
        },
        Body::QueryResult {
            private: Some(a("10.1.0.5:8080")),
            epoch: 4,
            public_ip: Some("203.0.113.1".parse().unwrap()),
        },
        Body::QueryResult {
            private: None,
            epoch: 4,
            public_ip: None,
        },
        Body::Ack {},
        Body::error(ErrorCode::NotOwner, "not yours"),
    ]
}

#[test]
fn every_body_roundtrips_and_fits() {
    let bodies = all_bodies();
    let mut types: Vec<&str> = bodies.iter().map(|b| b.type_name()).collect();
    types.dedup();
    assert_eq!(types, KNOWN_TYPES, "all_bodies covers KNOWN_TYPES in order");
    for (i, b) in bodies.into_iter().enumerate() {
        for env in [
            Envelope::request(u64::MAX, b.clone()),
            Envelope::response(i as u64, u64::MAX - 1, b.clone()),
        ] {
            let bytes = env.encode().unwrap();
            assert!(bytes.len() <= MAX_ENVELOPE);
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["body"]["type"], b.type_name());
            assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        }
    }
}

#[test]
fn register_previous_proxy_is_optional() {
    // Old senders omit it; it decodes as None.
    let old =
        br#"{"v":1,"id":1,"body":{"type":"register","transport":"tcp","local":"10.1.0.5:9618"}}"#;
    let env = Envelope::decode(old).unwrap();
    assert_eq!(
        env.body,
        Body::Register {
            transport: Transport::Tcp,
            local: a("10.1.0.5:9618"),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        }
    );
    let new = Envelope::request(
        2,
        Body::Register {
            transport: Transport::Tcp,
            local: a("10.1.0.5:9618"),
            previous_proxy: Some(a("203.0.113.10:40001")),
            previous_token: None,
            punch: false,
        },
    );
    let json = String::from_utf8(new.encode().unwrap()).unwrap();
    assert!(
        json.contains(r#""previous_proxy":"203.0.113.10:40001""#),
        "{json}"
    );
    assert_eq!(Envelope::decode(json.as_bytes()).unwrap(), new);
}

#[test]
fn registered_token_only_for_udp() {
    // TCP registrations: no token on the wire, and old replies without
    // one decode as None.
    let tcp = Envelope::response(
        3,
        1,
        Body::Registered {
            proxy: a("203.0.113.10:40001"),
            lease_ms: 35_000,
            token: None,
        },
    );
    let json = String::from_utf8(tcp.encode().unwrap()).unwrap();
    assert_eq!(
        json,
        r#"{"v":1,"id":3,"re":1,"body":{"type":"registered","proxy":"203.0.113.10:40001","lease_ms":35000}}"#
    );
    assert_eq!(Envelope::decode(json.as_bytes()).unwrap(), tcp);
    // UDP registrations carry the 32-hex-char token.
    let udp = Envelope::response(
        4,
        2,
        Body::Registered {
            proxy: a("203.0.113.10:40002"),
            lease_ms: 35_000,
            token: Some("00112233445566778899aabbccddeeff".into()),
        },
    );
    let json = String::from_utf8(udp.encode().unwrap()).unwrap();
    assert!(
        json.contains(r#""token":"00112233445566778899aabbccddeeff""#),
        "{json}"
    );
    assert_eq!(Envelope::decode(json.as_bytes()).unwrap(), udp);
}

#[test]
fn exact_json_of_register_and_connect_decision() {
    let req = Envelope::request(
        7301,
        Body::Register {
            transport: Transport::Tcp,
            local: a("10.1.0.5:9618"),
            previous_proxy: None,
            previous_token: None,
            punch: false,
        },
    );
    assert_eq!(
        String::from_utf8(req.encode().unwrap()).unwrap(),
        r#"{"v":1,"id":7301,"body":{"type":"register","transport":"tcp","local":"10.1.0.5:9618"}}"#
    );
    let rep = Envelope::response(
        55,
        7301,
        Body::ConnectDecision {
            route: Route::Relay {
                addr: a("203.0.113.10:9001"),
                connect_id: cid(),
            },
        },
    );
    assert_eq!(
        String::from_utf8(rep.encode().unwrap()).unwrap(),
        r#"{"v":1,"id":55,"re":7301,"body":{"type":"connect_decision","route":{"kind":"relay","addr":"203.0.113.10:9001","connect_id":"00112233445566778899aabbccddeeff"}}}"#
    );
    let ack = Envelope::response(1, 2, Body::Ack {});
    assert_eq!(
        String::from_utf8(ack.encode().unwrap()).unwrap(),
        r#"{"v":1,"id":1,"re":2,"body":{"type":"ack"}}"#
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let j = br#"{"v":1,"id":9,"future":[1,2],"body":{"type":"ack","extra":{"x":1}}}"#;
    assert_eq!(
        Envelope::decode(j).unwrap(),
        Envelope::request(9, Body::Ack {})
    );
    let j = br#"{"v":1,"id":9,"re":3,"body":{"type":"connect_decision","route":{"kind":"direct","addr":"1.2.3.4:5","via":"x"},"hint":1}}"#;
    assert_eq!(
        Envelope::decode(j).unwrap().body,
        Body::ConnectDecision {
            route: Route::Direct {
                addr: a("1.2.3.4:5")
            }
        }
    );
    // unknown error codes map to Unknown
    let j = br#"{"v":1,"id":9,"re":3,"body":{"type":"error","code":"teapot","reason":""}}"#;
    assert_eq!(
        Envelope::decode(j).unwrap().body,
        Body::Error {
            code: ErrorCode::Unknown,
            reason: String::new()
        }
    );
}

#[test]
fn newer_version_and_unknown_type() {
    let j = br#"{"v":2,"id":9,"body":{"type":"teleport"}}"#;
    let e = Envelope::decode(j).unwrap_err();
    assert_eq!(
        e,
        DecodeError::Version {
            v: 2,
            id: 9,
            re: None
        }
    );
    assert_eq!(e.error_code(), Some(ErrorCode::Version));
    let j = br#"{"v":1,"id":9,"body":{"type":"teleport","to":"mars"}}"#;
    let e = Envelope::decode(j).unwrap_err();
    assert!(
        matches!(&e, DecodeError::UnknownType { type_name, id: 9, re: None } if type_name == "teleport")
    );
    assert_eq!(e.error_code(), Some(ErrorCode::Unsupported));
}

#[test]
fn bad_bodies_and_malformed() {
    let bad: &[&[u8]] = &[
        br#"{"v":1,"id":9,"body":{"type":"register","transport":"sctp","local":"1.2.3.4:5"}}"#,
        br#"{"v":1,"id":9,"body":{"type":"register","transport":"tcp"}}"#,
        br#"{"v":1,"id":9,"body":{"type":"register","transport":"tcp","local":"nope"}}"#,
        br#"{"v":1,"id":9,"body":{"type":"connect_back","connect_id":"00112233445566778899AABBCCDDEEFF","dial":"1.2.3.4:5","proxy":"1.2.3.4:5","logical_peer":"1.2.3.4:5"}}"#,
        br#"{"v":1,"id":9,"body":{"type":"connect_decision","route":{"kind":"wormhole"}}}"#,
        br#"{"v":1,"id":9,"body":{"no_type":1}}"#,
        br#"{"v":1,"id":9,"body":[1]}"#,
        br#"{"v":1,"id":9,"body":{"type":7}}"#,
        br#"{"v":0,"id":9,"body":{"type":"ack"}}"#,
        br#"{"v":1,"id":9,"body":{"type":"forward","transport":"tcp","private":"1.2.3.4:5","probe_port":70000}}"#,
        br#"{"v":1,"id":9,"body":{"type":"punch_end","proxy":"1.2.3.4:5","peer":"[::1]:5","peer_proxy":"1.2.3.4:6"}}"#,
        br#"{"v":1,"id":9,"body":{"type":"punch_end","proxy":"1.2.3.4:5","peer":"1.2.3.4:7"}}"#,
    ];
    for j in bad {
        let e = Envelope::decode(j).unwrap_err();
        assert!(
            matches!(
                e,
                DecodeError::BadBody {
                    id: 9,
                    re: None,
                    ..
                }
            ),
            "{}: {e:?}",
            String::from_utf8_lossy(j)
        );
        assert_eq!(e.error_code(), Some(ErrorCode::BadRequest));
    }
    let malformed: &[&[u8]] = &[
        b"",
        b"null",
        b"\xff\xfe",
        br#"{"v":1,"body":{"type":"ack"}}"#,
        br#"{"v":1,"id":-1,"body":{"type":"ack"}}"#,
        br#"{"v":1,"id":1}"#,
        br#"{"v":"1","id":1,"body":{"type":"ack"}}"#,
        br#"{"v":1,"id":1,"body":{"type":"ack"}"#,
    ];
    for j in malformed {
        let e = Envelope::decode(j).unwrap_err();
        assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
        assert_eq!(e.header(), None);
    }
    let deep = "[".repeat(1000);
    assert!(matches!(
        Envelope::decode(deep.as_bytes()),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn size_limit() {
    let big = Body::Error {
        code: ErrorCode::Internal,
        reason: "x".repeat(MAX_ENVELOPE),
    };
    assert!(matches!(
        Envelope::request(1, big).encode(),
        Err(EncodeError::TooLarge {
            limit: MAX_ENVELOPE,
            ..
        })
    ));
    // Body::error truncates so it always fits, even with multi-byte chars.
    let e = Body::error(ErrorCode::Internal, "é".repeat(1000));
    let Body::Error { reason, .. } = &e else {
        unreachable!()
    };
    assert!(reason.len() <= MAX_REASON);
    assert!(Envelope::response(u64::MAX, u64::MAX, e).encode().is_ok());
    assert_eq!(
        Envelope::decode(&vec![b' '; MAX_DATAGRAM + 1]),
        Err(DecodeError::TooLarge(MAX_DATAGRAM + 1))
    );
    assert_eq!(MAX_ENVELOPE + crate::auth::KEYED_OVERHEAD, MAX_DATAGRAM);
}

#[test]
fn heartbeat_batches_fit() {
    assert_eq!(
        heartbeat_batches(&[]),
        vec![Body::Heartbeat { proxies: vec![] }]
    );
    let many: Vec<SocketAddr> = (0..500u16)
        .map(|i| {
            if i % 2 == 0 {
                SocketAddr::from(([203, 0, 113, 200], 60000 + i))
            } else {
                format!("[2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}]:65535")
                    .parse()
                    .unwrap()
            }
        })
        .collect();
    let batches = heartbeat_batches(&many);
    assert!(batches.len() > 1);
    let mut back = Vec::new();
    for b in batches {
        let env = Envelope::response(u64::MAX, u64::MAX, b.clone());
        assert!(env.encode().is_ok());
        let Body::Heartbeat { proxies } = b else {
            unreachable!()
        };
        back.extend(proxies);
    }
    assert_eq!(back, many);
}

#[test]
fn connect_id_parser() {
    let s = "00112233445566778899aabbccddeeff";
    assert_eq!(ConnectId::parse(s).unwrap(), cid());
    assert_eq!(cid().to_string(), s);
    assert_eq!(ConnectId::parse(""), Err(ConnectIdError::Length(0)));
    assert_eq!(ConnectId::parse(&s[1..]), Err(ConnectIdError::Length(31)));
    assert_eq!(
        ConnectId::parse("00112233445566778899AABBCCDDEEFF"),
        Err(ConnectIdError::NotLowerHex)
    );
    assert_eq!(
        ConnectId::parse("0011223344556677889 aabbccddeeff"),
        Err(ConnectIdError::NotLowerHex)
    );
    // 32 bytes but multi-byte chars: rejected, no panic
    assert!(ConnectId::parse("éééééééééééééééé").is_err());
    let r: Result<ConnectId, _> = serde_json::from_str("\"00112233445566778899aabbccddeegg\"");
    assert!(r.is_err());
}
