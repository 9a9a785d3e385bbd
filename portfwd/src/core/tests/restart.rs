//! Restart (mirror replay, epoch, lock), sync and probes, on the tests'
//! clock.

use super::*;

#[test]
fn restart_replays_mirror_and_bumps_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    assert_eq!(c.epoch(), 1);
    // a second daemon on the same state directory is refused
    assert!(matches!(
        Core::open(cfg(), FakeKernel::new(), dir.path(), Instant::now()),
        Err(CoreError::Locked(_))
    ));
    let p = public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41000)));
    one(&mut c, A1, fwd(A1, 8080, None, 41001)); // reuse record (deprecated one stays)
    one(&mut c, A2, fwd(A2, 53, Some(20009), 1));
    one(
        &mut c,
        A2,
        Body::Delete {
            transport: Transport::Tcp,
            private: sa(A2, 53),
        },
    );
    let table = c.table().clone();
    drop(c); // crash: nothing else happens
             // a torn record at the tail, as a crash mid-append leaves it
    let path = dir.path().join("mirror");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"0badc0de A tcp 20008 10.1.0.11:1");
    std::fs::write(&path, bytes).unwrap();
    // reboot: empty kernel table
    let mut k = FakeKernel::new();
    k.elems = None;
    let (c, rep) = Core::open(cfg(), k, dir.path(), Instant::now()).unwrap();
    assert_eq!(c.epoch(), 2);
    assert_eq!(c.table(), &table);
    assert_eq!(rep.replay.torn_bytes, 32);
    assert!(rep.kernel_replaced);
    assert_eq!(
        c.table().get((Transport::Tcp, p)).unwrap().probe_port,
        41001
    );
    assert_consistent(&c);
    // compacted at open: one record per mapping
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.lines().filter(|l| !l.starts_with('#')).count(),
        1,
        "{text}"
    );
}

#[test]
fn a_corrupt_delete_record_does_not_resurrect_the_mapping_in_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
    one(&mut c, A1, fwd(A1, 2, Some(20002), 1));
    one(&mut c, A1, del(A1, 2));
    one(&mut c, A2, fwd(A2, 3, Some(20003), 1));
    // kill -9: the kernel keeps its elements
    let kernel_then = c.kernel().elems.clone();
    drop(c);
    let path = dir.path().join("mirror");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(" D tcp 20002\n"), "{text}");
    std::fs::write(&path, text.replace(" D tcp 20002\n", " D tcp 20003\n")).unwrap();
    let mut k = FakeKernel::new();
    k.elems = kernel_then;
    let (c, rep) = Core::open(cfg(), k, dir.path(), Instant::now()).unwrap();
    assert_eq!(rep.replay.bad, 1);
    let kernel = c.kernel().elems.as_ref().unwrap();
    assert!(
        !kernel.contains_key(&(Transport::Tcp, 20002)),
        "resurrected"
    );
    // 20001 was live before the corrupt line: it may have been its target
    assert!(!kernel.contains_key(&(Transport::Tcp, 20001)), "{kernel:?}");
    assert!(kernel.contains_key(&(Transport::Tcp, 20003)), "after it");
    // 20001 and 20002 (whose delete was the corrupt line)
    assert_eq!(c.counters().quarantined, 2);
    assert_consistent(&c);
}

#[test]
fn restart_with_a_narrower_policy_removes_what_it_refuses_from_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
    one(&mut c, A1, fwd(A1, 9, Some(20009), 1));
    one(&mut c, A2, fwd(A2, 2, Some(20002), 1));
    let kernel_then = c.kernel().elems.clone();
    drop(c);
    let mut narrow = cfg();
    narrow.private = "10.1.0.8/30".parse().unwrap(); // a1 (.11) in, a2 (.12) out
    narrow.ports = "20000-20005".parse().unwrap();
    let mut k = FakeKernel::new();
    k.elems = kernel_then;
    let (c, rep) = Core::open(narrow.clone(), k, dir.path(), Instant::now()).unwrap();
    let keys: Vec<u16> = c.table().iter().map(|(k, _)| k.1).collect();
    assert_eq!(keys, vec![20001]);
    assert_eq!(rep.replay.quarantined.len(), 2);
    assert_eq!(
        c.kernel().elems.as_ref().unwrap(),
        &c.table().kernel_elements(),
        "kernel == table"
    );
    assert_eq!(mirror_table(&c), *c.table(), "compacted away");
}

#[test]
fn sync_repairs_kernel_and_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    for i in 0..3 {
        one(&mut c, A1, fwd(A1, 100 + i, None, 1));
        one(&mut c, A1, fwd(A1, 100 + i, None, 2)); // deprecated records
    }
    let grown = c.mirror().len();
    // operator flushed the table
    c.kernel_mut().elems = None;
    let rep = c.sync(Instant::now());
    assert!(rep.kernel_replaced);
    assert!(c.mirror().len() < grown, "compacted");
    assert_consistent(&c);
    // an element deleted by hand and a stray one added by hand
    let k = c.kernel_mut().elems.as_mut().unwrap();
    let first = *k.keys().next().unwrap();
    k.remove(&first);
    k.insert((Transport::Udp, 20005), "10.1.0.12:9".parse().unwrap());
    let rep = c.sync(Instant::now());
    assert_eq!(
        (rep.kernel_added, rep.kernel_removed, rep.kernel_replaced),
        (1, 1, false)
    );
    assert_consistent(&c);
    // nothing to do
    let rep = c.sync(Instant::now());
    assert_eq!(
        (rep.kernel_added, rep.kernel_removed, rep.table_fixed),
        (0, 0, 0)
    );
}

#[test]
fn missing_kernel_table_during_add_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    one(&mut c, A1, fwd(A1, 1, None, 1));
    c.kernel_mut().elems = None; // deleted by hand
    public_port(&one(&mut c, A1, fwd(A1, 2, None, 1)));
    assert_eq!(c.kernel().elems.as_ref().unwrap().len(), 2);
    assert_consistent(&c);
}

#[test]
fn probes_remove_dead_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    let t0 = Instant::now();
    one(&mut c, A1, fwd(A1, 1, None, 41000));
    one(
        &mut c,
        A1,
        Body::Forward {
            transport: Transport::Udp,
            private: sa(A1, 1),
            desired_public_port: None,
            probe_port: 41000,
        },
    );
    one(&mut c, A2, fwd(A2, 2, None, 42000));
    one(&mut c, A2, fwd(A2, 3, None, 42001));
    let mut targets = c.probe_targets();
    targets.sort();
    assert_eq!(targets.len(), 3, "one probe per management socket");
    let m1: SocketAddrV4 = "10.1.0.11:41000".parse().unwrap();
    let m2: SocketAddrV4 = "10.1.0.12:42000".parse().unwrap();
    let m3: SocketAddrV4 = "10.1.0.12:42001".parse().unwrap();
    let started = Instant::now();
    // refused: both of m1's mappings go at once
    let removed = c.apply_probe_results(
        started,
        &[
            (m1, ProbeOutcome::Refused),
            (m2, ProbeOutcome::Alive),
            (m3, ProbeOutcome::Failed),
        ],
    );
    assert_eq!(removed.len(), 2);
    assert_eq!(c.table().len(), 2);
    assert_consistent(&c);
    // a timeout needs probe_failures (2) rounds in a row
    let removed = c.apply_probe_results(
        Instant::now(),
        &[(m2, ProbeOutcome::Alive), (m3, ProbeOutcome::Failed)],
    );
    assert_eq!(removed.len(), 1);
    assert_consistent(&c);
    // a mapping made after the round started is left alone
    one(&mut c, A1, fwd(A1, 5, None, 41000));
    let removed = c.apply_probe_results(t0, &[(m1, ProbeOutcome::Refused)]);
    assert!(removed.is_empty());
    assert_eq!(c.table().len(), 2);
}

/// The core reads no clock: a restart, probe rounds, the sync and the rate
/// limit all run on the time they are given, so hours pass here in no time.
#[test]
fn the_callers_clock_decides_what_a_probe_round_may_remove() {
    use crate::mirror::Record;
    use crate::table::Entry;

    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let mut cfg = cfg();
    cfg.rate = 1.0;
    cfg.burst = 2.0;
    let (mut c, _) = Core::open(cfg.clone(), FakeKernel::new(), dir.path(), at(0)).unwrap();
    let forward = |c: &mut Core<FakeKernel>, secs, port| {
        let req = (IpAddr::from(A1), fwd(A1, port, None, 41000));
        c.handle_batch(at(secs), vec![req]).pop().unwrap()
    };
    let m: SocketAddrV4 = "10.1.0.11:41000".parse().unwrap();
    let refused = [(m, ProbeOutcome::Refused)];

    public_port(&forward(&mut c, 10, 1));
    assert!(
        c.apply_probe_results(at(5), &refused).is_empty(),
        "a round that started before the mapping leaves it alone"
    );
    // Burst 2 at 10 s, then one token per second.
    public_port(&forward(&mut c, 10, 2));
    assert_eq!(code(&forward(&mut c, 10, 3)), ErrorCode::Busy);
    public_port(&forward(&mut c, 11, 3));
    c.sync(at(12));
    assert!(c.rate_state(A1.into()).is_some(), "bucket not full: kept");
    c.sync(at(3600));
    assert_eq!(c.rate_state(A1.into()), None, "full again: forgotten");

    // Restart at 100 s: the restored mappings count as made then.
    drop(c);
    let (mut c, _) = Core::open(cfg, FakeKernel::new(), dir.path(), at(100)).unwrap();
    assert_eq!(c.table().len(), 3);
    assert!(c.apply_probe_results(at(50), &refused).is_empty());
    assert_eq!(c.apply_probe_results(at(101), &refused).len(), 3);
    assert!(c.table().is_empty());

    // A mapping the sync at 200 s brings back from the mirror file counts
    // as made at 200 s.
    let entry = Entry {
        private: "10.1.0.11:7".parse().unwrap(),
        probe_port: 41000,
    };
    c.mirror_mut()
        .append(&[Record::Add((Transport::Tcp, 20007), entry)])
        .unwrap();
    assert_eq!(c.sync(at(200)).table_fixed, 1);
    assert!(c.apply_probe_results(at(150), &refused).is_empty());
    assert_eq!(
        c.apply_probe_results(at(201), &refused),
        vec![(Transport::Tcp, 20007)]
    );
    assert_consistent(&c);
}
