//! Conntrack: which ports are dirty and when handing one out flushes
//! (module docs of [`crate::core`], "Conntrack").

use super::*;

fn flushes(c: &Core<FakeKernel>) -> Vec<String> {
    c.kernel()
        .journal
        .iter()
        .filter(|j| j.starts_with("flush") || j.starts_with("conntrack"))
        .cloned()
        .collect()
}

#[test]
fn a_fresh_port_skips_the_conntrack_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    // one listing at the start, after the kernel table is synced
    assert_eq!(flushes(&c), ["conntrack_ports"]);
    assert_eq!(c.kernel().journal.last().unwrap(), "conntrack_ports");
    let r = c.handle_batch(
        Instant::now(),
        vec![
            (IpAddr::from(A1), fwd(A1, 1, Some(20001), 1)),
            (IpAddr::from(A1), fwd(A1, 2, Some(20002), 1)),
        ],
    );
    assert_eq!((public_port(&r[0]), public_port(&r[1])), (20001, 20002));
    assert_eq!(flushes(&c), ["conntrack_ports"], "no conntrack tool run");
    assert_eq!(c.counters().conntrack_skipped, 2);
    assert_consistent(&c);
}

#[test]
fn a_released_port_is_flushed_when_handed_to_another_holder() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let k = (Transport::Tcp, 20005);
    one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
    assert!(!c.is_dirty((Transport::Udp, 20005)));
    one(&mut c, A1, del(A1, 8080));
    assert!(c.is_dirty(k), "released");
    assert!(!c.is_dirty((Transport::Udp, 20005)), "UDP is another port");
    c.kernel_mut().conntrack.insert(k);
    assert_eq!(
        public_port(&one(&mut c, A2, fwd(A2, 9, Some(20005), 1))),
        20005
    );
    assert_eq!(c.kernel().flushed, vec![k]);
    assert!(c.kernel().conntrack.is_empty());
    assert_eq!(c.counters().conntrack_flushed, 1);
    assert!(!c.is_dirty(k), "flushed: clean while A2 holds it");
    // a moved mapping releases its old port
    assert_eq!(
        public_port(&one(&mut c, A2, fwd(A2, 9, Some(20006), 1))),
        20006
    );
    assert!(c.is_dirty(k));
    // a probe removal releases it too
    let m: SocketAddrV4 = "10.1.0.12:1".parse().unwrap();
    let removed = c.apply_probe_results(Instant::now(), &[(m, ProbeOutcome::Refused)]);
    assert_eq!(removed, vec![(Transport::Tcp, 20006)]);
    assert!(c.is_dirty((Transport::Tcp, 20006)));
    c.kernel_mut().flushed.clear();
    one(&mut c, A1, fwd(A1, 7, Some(20006), 1));
    assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20006)]);
    assert_consistent(&c);
}

#[test]
fn ports_with_entries_at_startup_are_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
    drop(c);
    // entries of a mapping deleted by the previous run, just before a crash
    let mut k = FakeKernel::new();
    k.elems = None;
    k.conntrack.insert((Transport::Tcp, 20003));
    let (mut c, _) = Core::open(cfg(), k, dir.path(), Instant::now()).unwrap();
    assert!(c.is_dirty((Transport::Tcp, 20001)), "restored mapping");
    assert!(c.is_dirty((Transport::Tcp, 20003)));
    assert!(!c.is_dirty((Transport::Udp, 20003)));
    assert!(!c.is_dirty((Transport::Tcp, 20004)));
    one(&mut c, A2, fwd(A2, 3, Some(20003), 1));
    one(&mut c, A2, fwd(A2, 4, Some(20004), 1));
    assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20003)]);
    assert_eq!(c.counters().conntrack_skipped, 1);
    assert_consistent(&c);
}

#[test]
fn a_failed_flush_leaves_the_port_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let k = (Transport::Tcp, 20005);
    one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
    one(&mut c, A1, del(A1, 8080));
    c.kernel_mut().conntrack.insert(k);
    c.kernel_mut().fail_conntrack = true;
    // the mapping is installed; the failure is logged and counted
    assert_eq!(
        public_port(&one(&mut c, A2, fwd(A2, 9, Some(20005), 1))),
        20005
    );
    assert_eq!(flushes(&c).last().unwrap(), "flush [(Tcp, 20005)]");
    assert_eq!(c.counters().kernel_errors, 1);
    assert!(c.is_dirty(k));
    c.kernel_mut().fail_conntrack = false;
    one(&mut c, A2, del(A2, 9));
    one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
    assert_eq!(c.kernel().flushed, vec![k]);
    assert!(!c.is_dirty(k));
    assert_consistent(&c);
}

#[test]
fn unknown_conntrack_state_flushes_every_port_until_a_listing_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut k = FakeKernel::new();
    k.fail_conntrack = true;
    let (mut c, _) = Core::open(cfg(), k, dir.path(), Instant::now()).unwrap();
    assert!(c.is_dirty((Transport::Tcp, 20001)));
    c.kernel_mut().fail_conntrack = false;
    one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
    assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20001)]);
    c.sync(Instant::now()); // lists again
    assert!(!c.is_dirty((Transport::Tcp, 20002)));
    one(&mut c, A1, fwd(A1, 2, Some(20002), 1));
    assert_eq!(c.kernel().flushed.len(), 1);
    // The kernel table vanished (its elements unknown): every port is
    // dirty until the listing the same sync makes.
    c.kernel_mut().elems = None;
    c.kernel_mut().conntrack.insert((Transport::Udp, 20007));
    c.sync(Instant::now());
    assert!(c.is_dirty((Transport::Udp, 20007)));
    assert!(c.is_dirty((Transport::Tcp, 20002)), "mapped");
    assert!(!c.is_dirty((Transport::Tcp, 20008)));
    // an element removed by the sync (added by hand) makes its port dirty
    let stray = (Transport::Tcp, 20009);
    c.kernel_mut()
        .elems
        .as_mut()
        .unwrap()
        .insert(stray, "10.1.0.12:9".parse().unwrap());
    c.sync(Instant::now());
    assert!(c.is_dirty(stray));
    assert_consistent(&c);
}

#[test]
fn a_port_freed_and_taken_in_one_batch_stays_in_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
    // a1 lets 20005 go and a2 asks for it, in the same batch
    let r = c.handle_batch(
        Instant::now(),
        vec![
            (IpAddr::from(A1), del(A1, 8080)),
            (IpAddr::from(A2), fwd(A2, 9090, Some(20005), 1)),
        ],
    );
    assert_eq!(r[0], Body::Deleted { epoch: 1 });
    assert_eq!(public_port(&r[1]), 20005);
    assert_consistent(&c);
    // ...and a restart neither loses a2's mapping nor sees a conflict
    drop(c);
    let (c, rep) = Core::open(cfg(), FakeKernel::new(), dir.path(), Instant::now()).unwrap();
    assert_eq!(rep.replay.quarantined, vec![]);
    assert_eq!(
        c.table().get((Transport::Tcp, 20005)).map(|e| e.owner()),
        Some(Ipv4Addr::from(A2))
    );
}

#[test]
fn a_port_back_to_its_last_holder_keeps_its_flows() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let del = |ip, port| Body::Delete {
        transport: Transport::Tcp,
        private: sa(ip, port),
    };
    assert_eq!(
        public_port(&one(&mut c, A1, fwd(A1, 8080, Some(20005), 41000))),
        20005
    );
    one(&mut c, A1, del(A1, 8080));
    c.kernel_mut().flushed.clear();
    // The same socket address re-binds (iperf3 -u): its own flows stay.
    assert_eq!(
        public_port(&one(&mut c, A1, fwd(A1, 8080, Some(20005), 41001))),
        20005
    );
    assert!(c.kernel().flushed.is_empty(), "{:?}", c.kernel().flushed);
    one(&mut c, A1, del(A1, 8080));
    // Another client gets the port: the old flows go.
    assert_eq!(
        public_port(&one(&mut c, A2, fwd(A2, 9090, Some(20005), 41002))),
        20005
    );
    assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20005)]);
    assert_consistent(&c);
}
