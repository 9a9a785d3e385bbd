//! Simulated lossy link: several endpoints exchanging requests through a
//! network that drops 30% of datagrams, duplicates and reorders them, with
//! simulated time and a seeded deterministic PRNG.
//!
//! Checked for every seed:
//! - every request ends exactly once, as a matching Response (from the peer it
//!   was sent to, answering that very request) or as a Timeout, and never
//!   after its deadline (timeouts exactly at it);
//! - every request is surfaced to the receiver's application at most once,
//!   and exactly once if it completed, with the body that was sent;
//! - all state drains: nothing outstanding, caches empty after their TTL.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use gcb_proto::{Body, Config, Endpoint, Event, Now, PoolKey, RejectReason, RequestId, Transport};

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // avoid the all-zero state; mix the seed a little
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform-ish in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability pct/100.
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

const NODES: usize = 3;
const LOSS_PCT: u64 = 30;
const DUP_PCT: u64 = 15;
const UNIX_BASE: u64 = 1_700_000_000_000;

fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i as u8)), 9000)
}

fn node_of(a: SocketAddr) -> usize {
    (0..NODES).find(|&i| node_addr(i) == a).expect("known node")
}

/// The request body for tag `t`; the response echoes it.
fn request_body(t: u64) -> Body {
    let b = t.to_be_bytes();
    Body::Query {
        transport: Transport::Tcp,
        public: SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(b[2], b[3], b[4], b[5])),
            u16::from_be_bytes([b[6], b[7]]),
        ),
    }
}

fn response_for(req: &Body) -> Body {
    let Body::Query { public, .. } = req else {
        panic!("unexpected request {req:?}")
    };
    let IpAddr::V4(ip) = public.ip() else {
        panic!()
    };
    let o = ip.octets();
    let tag = u64::from_be_bytes([0, 0, o[0], o[1], o[2], o[3], 0, 0]) | public.port() as u64;
    Body::QueryResult {
        private: Some(*public),
        epoch: tag,
        public_ip: None,
    }
}

#[derive(Debug)]
enum Action {
    /// Deliver a datagram: (to node, from addr, payload).
    Deliver(usize, SocketAddr, Vec<u8>),
    /// Application of node answers (from, id, body).
    Respond(usize, SocketAddr, u64, Body),
    /// Node sends a new request with this tag to a node.
    Issue(usize, usize, u64),
}

/// Time-ordered actions; ties run in push order.
#[derive(Default)]
struct Agenda {
    seq: u64,
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    actions: HashMap<u64, Action>,
}

impl Agenda {
    fn push(&mut self, t: Instant, a: Action) {
        self.seq += 1;
        self.actions.insert(self.seq, a);
        self.heap.push(Reverse((t, self.seq)));
    }
    fn next_time(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }
    fn pop(&mut self) -> Action {
        let Reverse((_, s)) = self.heap.pop().expect("non-empty");
        self.actions.remove(&s).expect("action")
    }
}

#[derive(Debug)]
struct Sent {
    to: SocketAddr,
    tag: u64,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    completed: u64,
    timed_out: u64,
    retransmits: u64,
    from_cache: u64,
    pending_dups: u64,
    replayed: u64,
}

fn now_at(base: Instant, skew_ms: i64, t: Instant) -> Now {
    let ms = (t - base).as_millis() as i64;
    Now {
        mono: t,
        unix_ms: (UNIX_BASE as i64 + ms + skew_ms) as u64,
    }
}

fn run(seed: u64, keyed: bool, requests_per_node: u64, totals: &mut Totals) {
    let mut rng = XorShift::new(seed);
    let base = Instant::now();
    let key = keyed.then(|| PoolKey::from_file_contents(b"lossy-link-pool-key!").unwrap());
    let mut eps: Vec<Endpoint> = (0..NODES)
        .map(|_| Endpoint::new(Config::default(), key.clone(), rng.next()))
        .collect();
    // wall clocks disagree by up to +/- 5 s
    let skew: Vec<i64> = (0..NODES)
        .map(|_| rng.below(10_001) as i64 - 5_000)
        .collect();
    let deadline = Config::default().request_deadline;

    let mut agenda = Agenda::default();
    let mut tag = 0u64;
    for n in 0..NODES {
        for _ in 0..requests_per_node {
            tag += 1;
            let to = (n + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
            let at = base + Duration::from_millis(rng.below(20_000));
            agenda.push(at, Action::Issue(n, to, seq_tag(seed, tag)));
        }
    }

    let mut sent: HashMap<(usize, RequestId), Sent> = HashMap::new();
    let mut ended: HashMap<(usize, RequestId), u32> = HashMap::new();
    let mut surfaced: HashMap<(usize, SocketAddr, u64), (u32, Body)> = HashMap::new();
    let mut now = base;

    loop {
        // transmit everything queued, through the lossy network
        for (n, ep) in eps.iter_mut().enumerate() {
            while let Some(tx) = ep.poll_transmit() {
                assert!(tx.payload.len() <= gcb_proto::MAX_DATAGRAM);
                let to = node_of(tx.to);
                let copies = if rng.chance(LOSS_PCT) {
                    0
                } else if rng.chance(DUP_PCT) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let delay = Duration::from_millis(1 + rng.below(80));
                    agenda.push(
                        now + delay,
                        Action::Deliver(to, node_addr(n), tx.payload.clone()),
                    );
                }
            }
        }
        // application events
        for (n, ep) in eps.iter_mut().enumerate() {
            while let Some(ev) = ep.poll_event() {
                match ev {
                    Event::Request { from, id, body } => {
                        let e = surfaced.entry((n, from, id.0)).or_insert((0, body.clone()));
                        e.0 += 1;
                        assert_eq!(e.0, 1, "seed {seed}: request surfaced twice");
                        let delay = match rng.below(100) {
                            0..=69 => rng.below(50),
                            70..=94 => rng.below(2_000),
                            _ => 9_000 + rng.below(3_000),
                        };
                        let reply = response_for(&body);
                        agenda.push(
                            now + Duration::from_millis(delay),
                            Action::Respond(n, from, id.0, reply),
                        );
                    }
                    Event::Response {
                        from,
                        request,
                        body,
                    } => {
                        let s = sent.get(&(n, request)).expect("response to a sent request");
                        assert_eq!(from, s.to, "seed {seed}: response from the wrong peer");
                        assert!(now <= s.deadline, "seed {seed}: response after deadline");
                        assert_eq!(
                            body,
                            response_for(&request_body(s.tag)),
                            "seed {seed}: response does not match request"
                        );
                        *ended.entry((n, request)).or_default() += 1;
                        totals.completed += 1;
                    }
                    Event::Timeout { to, request } => {
                        let s = sent.get(&(n, request)).expect("timeout of a sent request");
                        assert_eq!(to, s.to);
                        assert_eq!(now, s.deadline, "seed {seed}: timeout not at deadline");
                        *ended.entry((n, request)).or_default() += 1;
                        totals.timed_out += 1;
                    }
                }
            }
        }
        // next instant: agenda or an endpoint timer
        let next_timer = eps.iter().filter_map(|e| e.poll_timeout()).min();
        let next_agenda = agenda.next_time();
        let next = match (next_timer, next_agenda) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => break,
            },
        };
        assert!(next >= now, "time went backwards");
        now = next;
        if next_timer == Some(now) {
            for (n, ep) in eps.iter_mut().enumerate() {
                if ep.poll_timeout().is_some_and(|t| t <= now) {
                    ep.handle_timeout(now_at(base, skew[n], now));
                }
            }
        }
        while agenda.next_time().is_some_and(|t| t <= now) {
            let action = agenda.pop();
            match action {
                Action::Deliver(to, from, payload) => {
                    eps[to].handle_datagram(now_at(base, skew[to], now), from, &payload)
                }
                Action::Respond(n, from, id, body) => eps[n]
                    .respond(now_at(base, skew[n], now), from, RequestId(id), body)
                    .unwrap(),
                Action::Issue(n, to, t) => {
                    let id = eps[n]
                        .send_request(now_at(base, skew[n], now), node_addr(to), request_body(t))
                        .unwrap();
                    let prev = sent.insert(
                        (n, id),
                        Sent {
                            to: node_addr(to),
                            tag: t,
                            deadline: now + deadline,
                        },
                    );
                    assert!(prev.is_none(), "request id reused");
                    totals.requests += 1;
                }
            }
        }
    }

    // every request ended exactly once
    assert_eq!(sent.len() as u64, NODES as u64 * requests_per_node);
    for (k, s) in &sent {
        assert_eq!(ended.get(k), Some(&1), "seed {seed}: request {k:?} {s:?}");
    }
    // every request surfaced at most once (checked above), exactly once if it
    // completed, and with the body that was sent
    let mut by_sender: HashMap<(usize, SocketAddr, u64), &(u32, Body)> = HashMap::new();
    for ((rcv, from, id), v) in &surfaced {
        by_sender.insert((*rcv, *from, *id), v);
    }
    for ((n, id), s) in &sent {
        let got = by_sender.get(&(node_of(s.to), node_addr(*n), id.0));
        if let Some((count, body)) = got {
            assert_eq!(*count, 1);
            assert_eq!(body, &request_body(s.tag), "seed {seed}: body changed");
        }
    }
    assert!(surfaced.len() <= sent.len());
    // all state drained (the loop ran until no timers were left)
    for ep in &eps {
        assert_eq!(ep.outstanding(), 0);
        assert_eq!(ep.cached(), 0);
        let st = ep.stats();
        assert_eq!(st.malformed, 0);
        assert_eq!(st.wrong_peer_responses, 0);
        for r in RejectReason::ALL {
            if r != RejectReason::Replayed {
                assert_eq!(st.rejected(r), 0, "seed {seed}: unexpected {r}");
            }
        }
        totals.retransmits += st.retransmits;
        totals.from_cache += st.duplicates_answered_from_cache;
        totals.pending_dups += st.duplicates_pending;
        totals.replayed += st.rejected(RejectReason::Replayed);
    }
}

/// Distinct, seed-dependent tags that fit the request body's 48 bits.
fn seq_tag(seed: u64, tag: u64) -> u64 {
    ((seed & 0xffff) << 32 | tag) & 0xffff_ffff_ffff
}

#[test]
fn lossy_link_many_seeds() {
    let mut totals = Totals::default();
    for seed in 0..200u64 {
        run(seed, seed % 2 == 1, 25, &mut totals);
    }
    eprintln!("{totals:?}");
    assert_eq!(totals.requests, 200 * 25 * NODES as u64);
    assert_eq!(totals.completed + totals.timed_out, totals.requests);
    // The harness really exercised loss and duplication...
    assert!(totals.retransmits > totals.requests / 2);
    assert!(totals.from_cache > 0);
    assert!(totals.pending_dups > 0);
    assert!(totals.replayed > 0, "keyed runs reject duplicated frames");
    // ...and reliability works: besides the ~5% of requests the application
    // deliberately answers after the deadline, almost everything completes.
    assert!(
        totals.completed * 100 > totals.requests * 90,
        "completion rate too low: {totals:?}"
    );
}
