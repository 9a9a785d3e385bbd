//! Unit tests of [`Core`] on the in-memory [`FakeKernel`] and a real
//! mirror file in a temporary directory: the paper's orders, rule reuse,
//! refusals, rollback, queries (here); conntrack flushes (`conntrack`);
//! restart, sync and probes (`restart`). Time is the tests' own: every
//! handler takes `now`, so nothing sleeps.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gcb_proto::{Body, ErrorCode, Transport};

use super::*;
use crate::kernel::{FakeKernel, Op};
use crate::mirror::replay;
use crate::policy::Policy;
use crate::table::Table;

mod conntrack;
mod restart;

const A1: [u8; 4] = [10, 1, 0, 11];
const A2: [u8; 4] = [10, 1, 0, 12];

fn cfg() -> CoreConfig {
    CoreConfig {
        public: Ipv4Addr::new(203, 0, 113, 1),
        private: "10.1.0.0/24".parse().unwrap(),
        ports: "20000-20009".parse().unwrap(),
        quota: 3,
        rate: 0.0,
        burst: 10.0,
        probe_failures: 2,
    }
}

/// The tests' policy for reading a mirror file (no quota).
fn policy() -> Policy {
    Policy {
        private: cfg().private,
        ports: cfg().ports,
        quota: usize::MAX,
    }
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn fwd(ip: [u8; 4], port: u16, desired: Option<u16>, probe: u16) -> Body {
    Body::Forward {
        transport: Transport::Tcp,
        private: sa(ip, port),
        desired_public_port: desired,
        probe_port: probe,
    }
}

fn del(ip: [u8; 4], port: u16) -> Body {
    Body::Delete {
        transport: Transport::Tcp,
        private: sa(ip, port),
    }
}

fn open(dir: &Path) -> Core<FakeKernel> {
    Core::open(cfg(), FakeKernel::new(), dir, Instant::now())
        .unwrap()
        .0
}

fn one(c: &mut Core<FakeKernel>, from: [u8; 4], b: Body) -> Body {
    c.handle_batch(Instant::now(), vec![(IpAddr::from(from), b)])
        .pop()
        .unwrap()
}

fn public_port(b: &Body) -> u16 {
    match b {
        Body::Forwarded { public, .. } => public.port(),
        other => panic!("not forwarded: {other:?}"),
    }
}

fn code(b: &Body) -> ErrorCode {
    match b {
        Body::Error { code, .. } => *code,
        other => panic!("not an error: {other:?}"),
    }
}

fn mirror_table(c: &Core<FakeKernel>) -> Table {
    replay(&std::fs::read(c.mirror().path()).unwrap(), &policy()).0
}

/// The three representations hold the same mappings.
fn assert_consistent(c: &Core<FakeKernel>) {
    assert_eq!(&mirror_table(c), c.table(), "mirror == table");
    assert_eq!(
        c.kernel().elems.as_ref().unwrap(),
        &c.table().kernel_elements(),
        "kernel == table"
    );
}

#[test]
fn add_order_is_table_mirror_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let path = c.mirror().path();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s2 = seen.clone();
    c.kernel_mut().on_apply = Some(Box::new(move |ops| {
        // When the kernel is asked, the record is already durable.
        let on_disk = replay(&std::fs::read(&path).unwrap(), &policy()).0;
        for op in ops {
            if let Op::Add(k, a) = op {
                assert_eq!(
                    on_disk.get(*k).map(|e| e.private),
                    Some(*a),
                    "mirror before kernel"
                );
                s2.borrow_mut().push(*k);
            }
        }
    }));
    let r = one(&mut c, A1, fwd(A1, 8080, None, 41000));
    assert_eq!(
        r,
        Body::Forwarded {
            public: sa([203, 0, 113, 1], 20000),
            epoch: 1
        }
    );
    assert_eq!(seen.borrow().as_slice(), &[(Transport::Tcp, 20000)]);
    assert_consistent(&c);
    // A port nobody held since the start has no entries to flush.
    assert!(c.kernel().flushed.is_empty());
}

#[test]
fn delete_order_is_table_kernel_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    one(&mut c, A1, fwd(A1, 8080, Some(20005), 41000));
    let path = c.mirror().path();
    let checked = Rc::new(RefCell::new(0));
    let ch = checked.clone();
    c.kernel_mut().on_apply = Some(Box::new(move |ops| {
        for op in ops {
            if let Op::Del(k) = op {
                // Kernel before mirror: the mirror still has it.
                let on_disk = replay(&std::fs::read(&path).unwrap(), &policy()).0;
                assert!(on_disk.get(*k).is_some(), "kernel before mirror");
                *ch.borrow_mut() += 1;
            }
        }
    }));
    let r = one(
        &mut c,
        A1,
        Body::Delete {
            transport: Transport::Tcp,
            private: sa(A1, 8080),
        },
    );
    assert_eq!(r, Body::Deleted { epoch: 1 });
    assert_eq!(*checked.borrow(), 1);
    assert!(c.table().is_empty());
    assert_consistent(&c);
    // idempotent
    let r = one(
        &mut c,
        A1,
        Body::Delete {
            transport: Transport::Tcp,
            private: sa(A1, 8080),
        },
    );
    assert_eq!(r, Body::Deleted { epoch: 1 });
    // only the owner may delete
    one(&mut c, A1, fwd(A1, 8080, None, 41000));
    let r = one(
        &mut c,
        A2,
        Body::Delete {
            transport: Transport::Tcp,
            private: sa(A1, 8080),
        },
    );
    assert_eq!(code(&r), ErrorCode::NotOwner);
    assert_eq!(c.table().len(), 1);
}

#[test]
fn rule_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let p = public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41000)));
    let applies = |c: &Core<FakeKernel>| {
        c.kernel()
            .journal
            .iter()
            .filter(|j| j.starts_with("apply"))
            .count()
    };
    let (n_apply, mlen) = (applies(&c), c.mirror().len());
    // same rule: nothing changes anywhere
    assert_eq!(public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41000))), p);
    assert_eq!(
        public_port(&one(&mut c, A1, fwd(A1, 8080, Some(p), 41000))),
        p
    );
    assert_eq!((applies(&c), c.mirror().len()), (n_apply, mlen));
    assert_eq!(c.counters().reused, 2);
    // same public port, new client info: table + mirror only
    assert_eq!(public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41001))), p);
    assert_eq!(applies(&c), n_apply, "kernel untouched");
    assert!(c.mirror().len() > mlen, "mirror appended");
    assert_eq!(
        c.table().get((Transport::Tcp, p)).unwrap().probe_port,
        41001
    );
    assert_eq!(c.counters().updated, 1);
    assert_consistent(&c);
    // a different desired port moves the mapping
    let q = public_port(&one(&mut c, A1, fwd(A1, 8080, Some(20007), 41001)));
    assert_eq!(q, 20007);
    assert_eq!(c.table().len(), 1);
    assert_consistent(&c);
}

#[test]
fn refusals_install_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let p = public_port(&one(&mut c, A2, fwd(A2, 80, Some(20001), 1)));
    let before = (
        c.table().clone(),
        c.mirror().len(),
        c.kernel().elems.clone(),
    );
    let cases = [
        (A1, fwd(A2, 8080, None, 1), ErrorCode::NotOwner),
        (A1, fwd(A1, 8080, Some(30000), 1), ErrorCode::PortRange),
        (A1, fwd(A1, 8080, Some(p), 1), ErrorCode::PortRange),
        (
            [203, 0, 113, 10],
            fwd([203, 0, 113, 10], 8080, None, 1),
            ErrorCode::Unauthorized,
        ),
        (
            [10, 2, 0, 11],
            fwd([10, 2, 0, 11], 8080, None, 1),
            ErrorCode::Unauthorized,
        ),
        (A1, fwd(A1, 0, None, 1), ErrorCode::BadRequest),
        (A1, fwd(A1, 8080, None, 0), ErrorCode::BadRequest),
        (
            A1,
            Body::Heartbeat { proxies: vec![] },
            ErrorCode::Unsupported,
        ),
    ];
    for (from, body, want) in cases {
        let r = one(&mut c, from, body.clone());
        assert_eq!(code(&r), want, "{body:?} -> {r:?}");
        let Body::Error { reason, .. } = &r else {
            unreachable!()
        };
        assert!(!reason.is_empty());
    }
    assert_eq!(
        (
            c.table().clone(),
            c.mirror().len(),
            c.kernel().elems.clone()
        ),
        before
    );
    // quota: 3 per client
    for i in 0..3 {
        public_port(&one(&mut c, A1, fwd(A1, 9000 + i, None, 1)));
    }
    let before = (c.table().clone(), c.mirror().len());
    let r = one(&mut c, A1, fwd(A1, 9100, None, 1));
    assert_eq!(code(&r), ErrorCode::Quota);
    assert_eq!((c.table().clone(), c.mirror().len()), before);
    // ...but re-asking for an existing mapping is fine
    public_port(&one(&mut c, A1, fwd(A1, 9000, None, 1)));
    assert_consistent(&c);
}

#[test]
fn range_exhaustion_and_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cfg();
    cfg.quota = 100;
    cfg.rate = 1.0;
    cfg.burst = 12.0;
    let (mut c, _) = Core::open(cfg, FakeKernel::new(), dir.path(), Instant::now()).unwrap();
    let t = Instant::now();
    let mut ports = Vec::new();
    for i in 0..10 {
        let r = c.handle_batch(t, vec![(IpAddr::from(A1), fwd(A1, 100 + i, None, 1))]);
        ports.push(public_port(&r[0]));
    }
    ports.sort_unstable();
    assert_eq!(ports, (20000..20010).collect::<Vec<_>>());
    let r = c.handle_batch(t, vec![(IpAddr::from(A1), fwd(A1, 200, None, 1))]);
    assert_eq!(code(&r[0]), ErrorCode::PortRange);
    // 12 tokens used (11 requests so far + this one), then busy
    let _ = c.handle_batch(
        t,
        vec![(
            IpAddr::from(A1),
            Body::Query {
                transport: Transport::Tcp,
                public: sa([203, 0, 113, 1], 1),
            },
        )],
    );
    let r = c.handle_batch(t, vec![(IpAddr::from(A1), fwd(A1, 100, None, 1))]);
    assert_eq!(code(&r[0]), ErrorCode::Busy);
    // other clients are not affected; the bucket refills
    let r = c.handle_batch(
        t,
        vec![(
            IpAddr::from(A2),
            Body::Delete {
                transport: Transport::Tcp,
                private: sa(A2, 1),
            },
        )],
    );
    assert_eq!(r[0], Body::Deleted { epoch: 1 });
    let r = c.handle_batch(
        t + Duration::from_secs(2),
        vec![(IpAddr::from(A1), fwd(A1, 100, None, 1))],
    );
    public_port(&r[0]);
}

#[test]
fn kernel_failure_rolls_back_only_the_failing_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    c.kernel_mut().fail_keys.insert((Transport::Tcp, 20003));
    let r = c.handle_batch(
        Instant::now(),
        vec![
            (IpAddr::from(A1), fwd(A1, 1, Some(20002), 1)),
            (IpAddr::from(A1), fwd(A1, 2, Some(20003), 1)),
            (IpAddr::from(A2), fwd(A2, 3, Some(20004), 1)),
        ],
    );
    assert_eq!(public_port(&r[0]), 20002);
    assert_eq!(code(&r[1]), ErrorCode::Internal);
    assert_eq!(public_port(&r[2]), 20004);
    assert!(c.table().get((Transport::Tcp, 20003)).is_none());
    assert_eq!(c.table().len(), 2);
    assert_consistent(&c);
    assert!(!c.kernel().flushed.contains(&(Transport::Tcp, 20003)));
    assert_eq!(c.counters().rolled_back, 1);
}

#[test]
fn mirror_failure_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    c.mirror_mut().fail_appends = true;
    let r = one(&mut c, A1, fwd(A1, 8080, None, 1));
    assert_eq!(code(&r), ErrorCode::Internal);
    assert!(c.table().is_empty());
    assert!(c.kernel().elems.as_ref().unwrap().is_empty());
    c.mirror_mut().fail_appends = false;
    public_port(&one(&mut c, A1, fwd(A1, 8080, None, 1)));
    assert_consistent(&c);
}

#[test]
fn query_is_answered_from_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let p = public_port(&one(&mut c, A1, fwd(A1, 8080, None, 1)));
    let q = |port| Body::Query {
        transport: Transport::Tcp,
        public: sa([203, 0, 113, 1], port),
    };
    assert_eq!(
        one(&mut c, A2, q(p)),
        Body::QueryResult {
            private: Some(sa(A1, 8080)),
            epoch: 1,
            public_ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                203, 0, 113, 1
            ))),
        }
    );
    assert_eq!(
        one(&mut c, A2, q(p + 1)),
        Body::QueryResult {
            private: None,
            epoch: 1,
            public_ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                203, 0, 113, 1
            ))),
        }
    );
    let other = Body::Query {
        transport: Transport::Tcp,
        public: sa([203, 0, 113, 2], p),
    };
    assert_eq!(
        one(&mut c, A2, other),
        Body::QueryResult {
            private: None,
            epoch: 1,
            public_ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                203, 0, 113, 1
            ))),
        }
    );
    let udp = Body::Query {
        transport: Transport::Udp,
        public: sa([203, 0, 113, 1], p),
    };
    assert_eq!(
        one(&mut c, A2, udp),
        Body::QueryResult {
            private: None,
            epoch: 1,
            public_ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                203, 0, 113, 1
            ))),
        }
    );
    let r = one(&mut c, [203, 0, 113, 10], q(p));
    assert_eq!(code(&r), ErrorCode::Unauthorized);
}
