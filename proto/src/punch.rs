//! GCB <-> GCB UDP hole punching (paper 4.2.1: "the first sendto() to a
//! brokered address sets up a channel ... records the peer in the receiver
//! list"): the sans-IO table of one UDP socket's punched peers.
//!
//! ## The exchange
//! Only *registered* GCB UDP sockets punch: the broker knows where such a
//! socket's datagrams come from (its *data address*, learnt from the
//! socket's keepalives, [`crate::udp`]). When the program sends to another
//! UDP registration's proxy (an address on the broker), the datagram goes
//! through the relay as before (no added latency) and the shim asks the
//! broker in the background (`punch_request` with its own proxy and
//! registration token). The broker answers `punch` to the sender and sends
//! `punch_back` to the destination's shim, both with a fresh random 128-bit
//! `nonce`, the other side's data address (and private address when both
//! sit behind the same public IP) and the *logical* addresses:
//!
//! | side | record key (`logical`: what its program uses) | `me` (the logical source it puts in direct frames) |
//! |---|---|---|
//! | initiator | the destination's proxy | its own data address |
//! | destination | the initiator's data address | its own proxy |
//!
//! i.e. each program keeps seeing the peer at the address it would see
//! through the relay (the relay shows a sender at its NAT mapping, and a
//! reply comes from the proxy it was sent to).
//!
//! Both sides then send `Dummy` frames (payload: the nonce) from the
//! program's socket to the other's data address, every [`PROBE_EVERY`], up
//! to [`PROBE_TRIES`] times. A Dummy with a known nonce is answered by a
//! `DummyAck` with the same nonce and makes its source the peer's verified
//! *direct* address; a DummyAck proves the round trip and switches the
//! record to [`State::Direct`]: from then on the program's datagrams to
//! `logical` go straight to the direct address as `From` frames whose header
//! carries `me`, and the receiver delivers them as coming from its own
//! `logical`. A `From` frame is accepted only from a record's verified
//! direct address and only with that record's logical address, so a third
//! party cannot put itself into the receiver list without the nonce, which
//! only the broker's (authenticated) control channel hands out. Anything
//! else is [`Verdict::Forged`]: dropped and counted.
//!
//! ## Falling back to the relay
//! * No DummyAck within the window (`PROBE_EVERY * PROBE_TRIES`, 1 s): the
//!   NATs do not allow it; the record is [`State::Relay`] and the program's
//!   datagrams keep going through the broker. The initiator asks again after
//!   [`RETRY_AFTER`].
//! * A send error on a direct record (the caller reports it with
//!   [`PunchTable::on_send_error`]): relay at once.
//! * The periodic flush: every [`RECHECK_EVERY`] a direct record is
//!   re-verified with a new Dummy/DummyAck exchange (and at once when it has
//!   sent for [`SILENT_AFTER`] without hearing anything from the peer). No
//!   ack within the window: relay. Data keeps flowing directly while the
//!   check runs, so a healthy channel is never interrupted, and a stale
//!   mapping blackholes traffic for at most one check interval.
//! * A record with no traffic either way for [`IDLE`] is removed.
//!
//! * A datagram from a direct peer that arrives through the relay (the peer
//!   lost its side: another program now uses its address) sends the record
//!   back to the relay at once; see [`PunchTable::on_relayed`].
//! * The peer's registration ends (its program closed the socket, or its
//!   lease expired at the broker): the broker sends `punch_end` to every
//!   registration it paired with it (naming the peer's data address and its
//!   proxy, so both sides' keys are covered) and the record is removed at
//!   once ([`PunchTable::remove`]). Without that, a program that takes the
//!   peer's address next would receive our direct frames (and Dummies) as
//!   data until a check failed. The broker remembers a bounded number of
//!   pairings per registration (see brokerd); a record it forgot still goes
//!   by the rules above.
//!
//! A record in the relay state still accepts direct frames from its
//! verified address (the peer may not have noticed yet) and still answers
//! the peer's Dummies, so the two sides converge on the relay without loss.
//!
//! Pure logic: time is passed in, nothing is sent here; the caller sends
//! what [`PunchTable::on_frame`] and [`PunchTable::poll`] return.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use crate::udp::{self, UdpKind, UDP_TOKEN_LEN};

/// Spacing of the Dummy frames of one punch or check.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Dummies per punch or check (the window is `PROBE_EVERY * PROBE_TRIES`).
pub const PROBE_TRIES: u8 = 10;
/// A direct record is re-verified this often (the periodic flush).
pub const RECHECK_EVERY: Duration = Duration::from_secs(30);
/// Sending directly without hearing from the peer for this long starts a check.
pub const SILENT_AFTER: Duration = Duration::from_secs(5);
/// A record without traffic either way for this long is removed.
pub const IDLE: Duration = Duration::from_secs(120);
/// After a failed punch (or a refusal), the initiator asks again after this.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);
/// A direct record younger than this ignores the peer's relayed datagrams
/// (ones sent before the peer went direct may still be on their way).
pub const RELAYED_GRACE: Duration = Duration::from_secs(1);
/// A punch request in flight is not repeated for this long.
pub const ASK_HOLD: Duration = Duration::from_secs(5);
/// Most records per socket (more peers are served by the relay).
pub const MAX_PEERS: usize = 1024;
/// Most remembered destinations (asked / refused) per socket.
const MAX_ASKED: usize = 4096;

/// A punch nonce: 32 lowercase hex characters (the token format).
pub type Nonce = [u8; UDP_TOKEN_LEN];

/// Where a record stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Dummies sent, no DummyAck yet: datagrams go through the relay.
    Punching,
    /// A DummyAck came back: datagrams go directly.
    Direct,
    /// The punch or a check failed: datagrams go through the relay.
    Relay,
}

#[derive(Debug, Clone)]
struct Probe {
    left: u8,
    next: Instant,
}

/// One peer of a socket.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address as this socket's program knows it.
    pub logical: SocketAddrV4,
    /// This socket's address as the peer's program knows it.
    pub me: SocketAddrV4,
    nonce: Nonce,
    /// Where Dummies go while punching (data address, maybe private address).
    targets: Vec<SocketAddrV4>,
    /// The verified source of the peer's frames.
    pub direct: Option<SocketAddrV4>,
    /// The record's state.
    pub state: State,
    /// When the record last became direct.
    direct_since: Instant,
    last_rx: Instant,
    last_tx: Instant,
    probe: Option<Probe>,
    next_check: Instant,
    retry_at: Instant,
}

/// What to do with a frame that did not come from the socket's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A direct datagram: deliver its payload as coming from this address.
    Deliver(SocketAddrV4),
    /// A good Dummy: send a `DummyAck` with this nonce to this address.
    Ack(SocketAddrV4, Nonce),
    /// A good DummyAck: nothing for the program.
    Consumed,
    /// Not from a verified peer, wrong nonce, wrong kind: drop and count.
    Forged,
}

/// Counters of one table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Records that reached [`State::Direct`].
    pub established: u64,
    /// Punches and checks that failed, send errors: back to the relay.
    pub fallbacks: u64,
    /// Frames dropped as [`Verdict::Forged`].
    pub forged: u64,
    /// Dummies handed out by [`PunchTable::poll`].
    pub dummies: u64,
    /// Direct records sent back to the relay by the peer's relayed datagrams.
    pub relayed: u64,
}

/// The punched peers of one UDP socket (the paper's receiver list records
/// with a local address).
#[derive(Debug, Default)]
pub struct PunchTable {
    peers: HashMap<SocketAddrV4, Peer>,
    /// Destinations asked about recently or refused, until the given time.
    asked: HashMap<SocketAddrV4, Instant>,
    /// Counters.
    pub counters: Counters,
}

fn parse_nonce(b: &[u8]) -> Option<Nonce> {
    if !udp::is_token(b) {
        return None;
    }
    let mut n = [0u8; UDP_TOKEN_LEN];
    n.copy_from_slice(b);
    Some(n)
}

impl PunchTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True without records.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The record for `logical`.
    pub fn get(&self, logical: &SocketAddrV4) -> Option<&Peer> {
        self.peers.get(logical)
    }

    /// Starts punching toward a peer (from the broker's `punch` or
    /// `punch_back`); replaces an older record for `logical`. False (nothing
    /// done) if `nonce` is not a nonce, there is no target, or the table is
    /// full.
    pub fn add(
        &mut self,
        logical: SocketAddrV4,
        me: SocketAddrV4,
        nonce: &[u8],
        targets: &[SocketAddrV4],
        now: Instant,
    ) -> bool {
        let Some(nonce) = parse_nonce(nonce) else {
            return false;
        };
        if targets.is_empty()
            || (self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&logical))
        {
            return false;
        }
        self.asked.remove(&logical);
        let mut t: Vec<SocketAddrV4> = Vec::with_capacity(2);
        for a in targets.iter().take(2) {
            if !t.contains(a) {
                t.push(*a);
            }
        }
        self.peers.insert(
            logical,
            Peer {
                logical,
                me,
                nonce,
                targets: t,
                direct: None,
                state: State::Punching,
                direct_since: now,
                last_rx: now,
                last_tx: now,
                probe: Some(Probe {
                    left: PROBE_TRIES,
                    next: now,
                }),
                next_check: now + RECHECK_EVERY,
                retry_at: now,
            },
        );
        true
    }

    /// Removes the record for `logical` (the broker's `punch_end`: the peer's
    /// registration is gone, and another program may take its address, which
    /// would receive our direct frames as data). True if there was one.
    pub fn remove(&mut self, logical: &SocketAddrV4) -> bool {
        self.peers.remove(logical).is_some()
    }

    /// Should the shim ask the broker to punch toward `dest` now? True at
    /// most once per [`ASK_HOLD`] per destination, never while a record for
    /// it is punching or direct, nor before a failed one's retry time.
    pub fn should_ask(&mut self, dest: SocketAddrV4, now: Instant) -> bool {
        if let Some(p) = self.peers.get(&dest) {
            if p.state != State::Relay || now < p.retry_at {
                return false;
            }
        }
        if self.asked.get(&dest).is_some_and(|&t| now < t) {
            return false;
        }
        if self.asked.len() >= MAX_ASKED {
            self.asked.retain(|_, t| now < *t);
            if self.asked.len() >= MAX_ASKED {
                self.asked.clear();
            }
        }
        self.asked.insert(dest, now + ASK_HOLD);
        true
    }

    /// The broker refused a punch toward `dest` (not a UDP proxy, no data
    /// address yet...) or did not answer: do not ask again for `hold`.
    pub fn refused(&mut self, dest: SocketAddrV4, now: Instant, hold: Duration) {
        self.asked.insert(dest, now + hold);
    }

    /// Where a datagram the program sends to `dest` goes directly: `(direct
    /// address, logical source for the From header)`, or None (relay).
    pub fn route(
        &mut self,
        dest: SocketAddrV4,
        now: Instant,
    ) -> Option<(SocketAddrV4, SocketAddrV4)> {
        let p = self.peers.get_mut(&dest)?;
        if p.state != State::Direct {
            return None;
        }
        let to = p.direct?;
        p.last_tx = now;
        if p.probe.is_none() && now.saturating_duration_since(p.last_rx) >= SILENT_AFTER {
            p.probe = Some(Probe {
                left: PROBE_TRIES,
                next: now,
            });
        }
        Some((to, p.me))
    }

    /// Sending directly to `dest` failed (unreachable, refused): relay.
    pub fn on_send_error(&mut self, dest: SocketAddrV4, now: Instant) {
        if let Some(p) = self.peers.get_mut(&dest) {
            if p.state == State::Direct {
                self.counters.fallbacks += 1;
            }
            p.state = State::Relay;
            p.probe = None;
            p.retry_at = now + RETRY_AFTER;
        }
    }

    /// A datagram from `logical` arrived through the relay (for the
    /// destination of a punch: framed by its proxy; for the initiator: plain,
    /// from the destination's proxy). A peer that holds its side of a direct
    /// record sends directly, so one that uses the relay has lost it: another
    /// program now uses its address (a restart, or a plain program, which would
    /// take our frames for data), or it fell back. A record that has been
    /// direct for [`RELAYED_GRACE`] goes to the relay without any probe (a
    /// Dummy could be someone else's data too): a GCB peer punches again
    /// through the broker (the initiator asks again at its next send; the
    /// destination gets a fresh `punch_back`, or the peer's Dummies restart the
    /// exchange). Younger records are left alone: datagrams sent through the
    /// relay just before the peer went direct may still be arriving. True if
    /// the record went to the relay.
    pub fn on_relayed(&mut self, logical: SocketAddrV4, now: Instant) -> bool {
        let Some(p) = self.peers.get_mut(&logical) else {
            return false;
        };
        if p.state != State::Direct || now.saturating_duration_since(p.direct_since) < RELAYED_GRACE
        {
            return false;
        }
        p.state = State::Relay;
        p.probe = None;
        p.retry_at = now;
        self.counters.relayed += 1;
        true
    }

    /// A GCBU frame (`kind`, header address `addr`, `payload`) that arrived
    /// from `src`, which is not the socket's proxy.
    pub fn on_frame(
        &mut self,
        src: SocketAddrV4,
        kind: UdpKind,
        addr: SocketAddrV4,
        payload: &[u8],
        now: Instant,
    ) -> Verdict {
        let v = self.classify(src, kind, addr, payload, now);
        if v == Verdict::Forged {
            self.counters.forged += 1;
        }
        v
    }

    fn classify(
        &mut self,
        src: SocketAddrV4,
        kind: UdpKind,
        addr: SocketAddrV4,
        payload: &[u8],
        now: Instant,
    ) -> Verdict {
        match kind {
            UdpKind::From => match self.peers.get_mut(&addr) {
                Some(p) if p.direct == Some(src) => {
                    p.last_rx = now;
                    Verdict::Deliver(addr)
                }
                _ => Verdict::Forged,
            },
            UdpKind::Dummy | UdpKind::DummyAck => {
                let Some(n) = parse_nonce(payload) else {
                    return Verdict::Forged;
                };
                let Some(p) = self
                    .peers
                    .values_mut()
                    .find(|p| udp::token_eq(&p.nonce, &n))
                else {
                    return Verdict::Forged;
                };
                p.direct = Some(src);
                p.last_rx = now;
                if kind == UdpKind::Dummy {
                    if p.state == State::Relay && p.probe.is_none() {
                        // The peer is (still) punching: try once more from here.
                        p.targets = vec![src];
                        p.probe = Some(Probe {
                            left: PROBE_TRIES,
                            next: now,
                        });
                    } else if p.state == State::Punching {
                        // The peer's Dummy came through, so its NAT has a hole for us
                        // now: send our next Dummy there at once, not at the next tick
                        // (our first one may have arrived before that hole existed).
                        p.targets.retain(|t| *t != src);
                        p.targets.insert(0, src);
                        if let Some(pr) = p.probe.as_mut() {
                            pr.next = now;
                        }
                    }
                    return Verdict::Ack(src, p.nonce);
                }
                if p.state != State::Direct {
                    self.counters.established += 1;
                    p.direct_since = now;
                }
                p.state = State::Direct;
                p.probe = None;
                p.next_check = now + RECHECK_EVERY;
                Verdict::Consumed
            }
            UdpKind::KeepAlive | UdpKind::To => Verdict::Forged,
        }
    }

    /// Runs the timers: appends the Dummies due now (`(to, nonce)`) to `out`,
    /// fails punches and checks whose window ended, removes idle records.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<(SocketAddrV4, Nonce)>) {
        let before = out.len();
        let mut fallbacks = 0;
        self.peers.retain(|_, p| {
            if now.saturating_duration_since(p.last_rx.max(p.last_tx)) >= IDLE {
                return false;
            }
            if p.state == State::Direct && p.probe.is_none() && now >= p.next_check {
                p.probe = Some(Probe {
                    left: PROBE_TRIES,
                    next: now,
                });
            }
            if let Some(pr) = p.probe.as_mut() {
                if now >= pr.next {
                    if pr.left == 0 {
                        p.probe = None;
                        if p.state != State::Relay {
                            fallbacks += 1;
                        }
                        p.state = State::Relay;
                        p.retry_at = now + RETRY_AFTER;
                    } else {
                        pr.left -= 1;
                        pr.next = now + PROBE_EVERY;
                        match (p.state, p.direct) {
                            (State::Direct, Some(d)) => out.push((d, p.nonce)),
                            _ => out.extend(p.targets.iter().map(|t| (*t, p.nonce))),
                        }
                    }
                }
            }
            true
        });
        self.counters.fallbacks += fallbacks;
        self.counters.dummies += (out.len() - before) as u64;
    }

    /// When [`PunchTable::poll`] has something to do next.
    pub fn next_due(&self) -> Option<Instant> {
        self.peers
            .values()
            .map(|p| {
                let idle = p.last_rx.max(p.last_tx) + IDLE;
                let t = match (&p.probe, p.state) {
                    (Some(pr), _) => pr.next,
                    (None, State::Direct) => p.next_check,
                    (None, _) => idle,
                };
                t.min(idle)
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }
    const N: &[u8; 32] = b"00112233445566778899aabbccddeeff";
    const N2: &[u8; 32] = b"ffeeddccbbaa99887766554433221100";

    fn dummies(t: &mut PunchTable, now: Instant) -> Vec<(SocketAddrV4, Nonce)> {
        let mut v = Vec::new();
        t.poll(now, &mut v);
        v
    }

    #[test]
    fn relayed_datagram_from_a_direct_peer_sends_it_to_the_relay() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        // The destination's view: the initiator at its data address.
        let peer = v4("203.0.113.2:9100");
        let me = v4("203.0.113.10:40001");
        assert!(t.add(peer, me, N, &[peer], t0));
        dummies(&mut t, t0);
        assert!(!t.on_relayed(peer, t0), "punching: nothing to undo");
        assert_eq!(
            t.on_frame(peer, UdpKind::DummyAck, v4("0.0.0.0:0"), N, t0),
            Verdict::Consumed
        );
        assert_eq!(t.route(peer, t0), Some((peer, me)));
        // Unknown records are left alone; so is a young direct record (relayed
        // datagrams sent before the peer went direct).
        assert!(!t.on_relayed(v4("198.51.100.7:1"), t0));
        assert!(!t.on_relayed(peer, t0 + RELAYED_GRACE / 2));
        assert_eq!(t.route(peer, t0), Some((peer, me)));
        // Later, the peer's address talks through the relay: relay at once, no Dummies
        // (another program may own that address now).
        let t1 = t0 + Duration::from_secs(3);
        assert!(t.on_relayed(peer, t1));
        assert!(!t.on_relayed(peer, t1), "already on the relay");
        assert_eq!(t.counters.relayed, 1);
        assert_eq!(t.route(peer, t1), None);
        assert_eq!(dummies(&mut t, t1), vec![]);
        assert_eq!(t.get(&peer).map(|p| p.state), Some(State::Relay));
        // The initiator side may ask the broker again at once.
        assert!(t.should_ask(peer, t1));
        // A GCB peer that still holds the nonce restarts the exchange with a Dummy.
        assert_eq!(
            t.on_frame(peer, UdpKind::Dummy, v4("0.0.0.0:0"), N, t1),
            Verdict::Ack(peer, *N)
        );
        assert_eq!(dummies(&mut t, t1), vec![(peer, *N)]);
        assert_eq!(
            t.on_frame(peer, UdpKind::DummyAck, v4("0.0.0.0:0"), N, t1),
            Verdict::Consumed
        );
        assert_eq!(t.route(peer, t1), Some((peer, me)));
        // ...and the grace runs from that moment.
        assert!(!t.on_relayed(peer, t1 + RELAYED_GRACE / 2));
        assert!(t.on_relayed(peer, t1 + RELAYED_GRACE));
    }

    #[test]
    fn remove_forgets_a_direct_record_at_once() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        let proxy = v4("203.0.113.10:40001");
        let peer = v4("203.0.113.2:9100");
        let me = v4("203.0.113.1:9000");
        assert!(t.add(proxy, me, N, &[peer], t0));
        assert_eq!(
            t.on_frame(peer, UdpKind::DummyAck, v4("0.0.0.0:0"), N, t0),
            Verdict::Consumed
        );
        assert_eq!(t.route(proxy, t0), Some((peer, me)));
        assert!(!t.remove(&peer), "keyed by the logical address only");
        assert!(t.remove(&proxy));
        assert!(!t.remove(&proxy), "already gone");
        assert!(t.is_empty());
        // Nothing goes directly any more, no Dummies, and the old peer's frames are forged.
        assert_eq!(t.route(proxy, t0), None);
        assert_eq!(dummies(&mut t, t0 + RECHECK_EVERY), vec![]);
        assert_eq!(
            t.on_frame(peer, UdpKind::From, proxy, b"x", t0),
            Verdict::Forged
        );
        assert_eq!(
            t.on_frame(peer, UdpKind::Dummy, v4("0.0.0.0:0"), N, t0),
            Verdict::Forged
        );
        // The next send may ask the broker again (it knows whether the peer is back).
        assert!(t.should_ask(proxy, t0));
    }

    #[test]
    fn punch_ack_direct_and_back() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        let proxy = v4("203.0.113.10:40001");
        let peer = v4("203.0.113.1:9000");
        let me = v4("203.0.113.2:9000");
        assert!(t.should_ask(proxy, t0));
        assert!(!t.should_ask(proxy, t0), "one request in flight");
        assert!(t.add(proxy, me, N, &[peer], t0));
        assert_eq!(dummies(&mut t, t0), vec![(peer, *N)]);
        assert_eq!(dummies(&mut t, t0), vec![], "spaced");
        assert_eq!(t.route(proxy, t0), None, "not before the ack");
        // The peer's Dummy: acked, its source verified.
        assert_eq!(
            t.on_frame(peer, UdpKind::Dummy, v4("0.0.0.0:0"), N, t0),
            Verdict::Ack(peer, *N)
        );
        assert_eq!(t.route(proxy, t0), None, "a Dummy proves one way only");
        // Direct frames from the verified source with the right logical address.
        assert_eq!(
            t.on_frame(peer, UdpKind::From, proxy, b"x", t0),
            Verdict::Deliver(proxy)
        );
        assert_eq!(
            t.on_frame(peer, UdpKind::DummyAck, v4("0.0.0.0:0"), N, t0),
            Verdict::Consumed
        );
        assert_eq!(t.route(proxy, t0), Some((peer, me)));
        assert_eq!(t.counters.established, 1);
        assert!(!t.should_ask(proxy, t0 + RETRY_AFTER * 2));
        // A send error: relay, asked again only after RETRY_AFTER.
        t.on_send_error(proxy, t0);
        assert_eq!(t.route(proxy, t0), None);
        assert!(!t.should_ask(proxy, t0 + Duration::from_secs(1)));
        assert!(t.should_ask(proxy, t0 + RETRY_AFTER));
        assert_eq!(t.counters.fallbacks, 1);
    }

    #[test]
    fn forged_frames() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        let proxy = v4("203.0.113.10:40001");
        let peer = v4("203.0.113.1:9000");
        let evil = v4("203.0.113.11:9000");
        t.add(proxy, v4("203.0.113.2:9000"), N, &[peer], t0);
        let z = v4("0.0.0.0:0");
        assert_eq!(t.on_frame(evil, UdpKind::Dummy, z, N2, t0), Verdict::Forged);
        assert_eq!(
            t.on_frame(evil, UdpKind::DummyAck, z, N2, t0),
            Verdict::Forged
        );
        assert_eq!(
            t.on_frame(evil, UdpKind::Dummy, z, b"short", t0),
            Verdict::Forged
        );
        assert_eq!(
            t.on_frame(evil, UdpKind::From, proxy, b"x", t0),
            Verdict::Forged
        );
        assert_eq!(
            t.on_frame(peer, UdpKind::From, proxy, b"x", t0),
            Verdict::Forged,
            "not verified yet"
        );
        assert_eq!(
            t.on_frame(peer, UdpKind::To, proxy, b"x", t0),
            Verdict::Forged
        );
        assert_eq!(
            t.on_frame(peer, UdpKind::KeepAlive, z, N, t0),
            Verdict::Forged
        );
        t.on_frame(peer, UdpKind::DummyAck, z, N, t0);
        assert_eq!(
            t.on_frame(evil, UdpKind::From, proxy, b"x", t0),
            Verdict::Forged,
            "other source"
        );
        assert_eq!(
            t.on_frame(peer, UdpKind::From, evil, b"x", t0),
            Verdict::Forged,
            "other logical"
        );
        assert_eq!(t.counters.forged, 9);
        assert_eq!(t.route(proxy, t0).map(|r| r.0), Some(peer));
        assert!(!t.add(evil, z, b"not a nonce", &[evil], t0));
        assert!(!t.add(evil, z, N2, &[], t0));
    }

    #[test]
    fn a_peer_dummy_while_punching_makes_our_next_dummy_due_at_once() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        let proxy = v4("203.0.113.10:40001");
        let peer = v4("203.0.113.1:9000");
        t.add(proxy, v4("203.0.113.2:9001"), N, &[peer], t0);
        assert_eq!(dummies(&mut t, t0).len(), 1, "the first Dummy goes at once");
        let later = t0 + PROBE_EVERY / 10;
        assert!(
            dummies(&mut t, later).is_empty(),
            "the next one waits a tick"
        );
        // The peer's Dummy arrives (from a port its NAT chose): acked, and ours is due now.
        let mapped = v4("203.0.113.1:9002");
        assert_eq!(
            t.on_frame(mapped, UdpKind::Dummy, v4("0.0.0.0:0"), N, later),
            Verdict::Ack(mapped, *N)
        );
        let out = dummies(&mut t, later);
        assert_eq!(out.first().map(|d| d.0), Some(mapped), "{out:?}");
    }

    #[test]
    fn no_ack_means_relay_and_checks_fail_over() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        let proxy = v4("203.0.113.10:40001");
        let (a, b) = (v4("203.0.113.1:9000"), v4("10.1.0.12:9000"));
        t.add(proxy, v4("203.0.113.1:9001"), N, &[a, b, a], t0);
        let mut sent = 0;
        let mut now = t0;
        for _ in 0..40 {
            sent += dummies(&mut t, now).len();
            now += PROBE_EVERY;
        }
        assert_eq!(sent, 2 * PROBE_TRIES as usize, "two targets, ten tries");
        assert_eq!(t.get(&proxy).unwrap().state, State::Relay);
        assert_eq!(t.counters.fallbacks, 1);
        assert_eq!(t.route(proxy, now), None);
        // A later Dummy from the peer: acked, and we try once more.
        assert_eq!(
            t.on_frame(a, UdpKind::Dummy, v4("0.0.0.0:0"), N, now),
            Verdict::Ack(a, *N)
        );
        assert_eq!(dummies(&mut t, now), vec![(a, *N)]);
        t.on_frame(a, UdpKind::DummyAck, v4("0.0.0.0:0"), N, now);
        assert!(t.route(proxy, now).is_some());
        // The periodic check: a Dummy to the direct address; no ack -> relay,
        // while data still went directly during the window.
        let check = now + RECHECK_EVERY;
        assert_eq!(dummies(&mut t, check), vec![(a, *N)]);
        assert!(t.route(proxy, check).is_some());
        let mut now = check;
        for _ in 0..PROBE_TRIES + 1 {
            now += PROBE_EVERY;
            dummies(&mut t, now);
        }
        assert_eq!(t.route(proxy, now), None);
        assert_eq!(t.counters.fallbacks, 2);
        // Idle records go away.
        dummies(&mut t, now + IDLE);
        assert!(t.is_empty());
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn silence_starts_a_check() {
        let t0 = Instant::now();
        let mut t = PunchTable::new();
        let proxy = v4("203.0.113.10:40001");
        let a = v4("203.0.113.1:9000");
        t.add(proxy, v4("203.0.113.2:9"), N, &[a], t0);
        dummies(&mut t, t0);
        t.on_frame(a, UdpKind::DummyAck, v4("0.0.0.0:0"), N, t0);
        let later = t0 + SILENT_AFTER;
        assert!(t.route(proxy, later).is_some());
        assert_eq!(t.next_due(), Some(later));
        assert_eq!(dummies(&mut t, later), vec![(a, *N)]);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn junk_never_panics_nor_verifies(
                frames in proptest::collection::vec(
                    (any::<u32>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..48)),
                    0..32,
                ),
            ) {
                let t0 = Instant::now();
                let mut t = PunchTable::new();
                let proxy = SocketAddrV4::new([203, 0, 113, 10].into(), 40001);
                let peer = SocketAddrV4::new([203, 0, 113, 1].into(), 9000);
                t.add(proxy, peer, b"00112233445566778899aabbccddeeff", &[peer], t0);
                for (ip, port, bytes) in frames {
                    let src = SocketAddrV4::new(ip.into(), port);
                    if let Some((kind, addr, payload)) = udp::parse(&bytes) {
                        let v = t.on_frame(src, kind, addr, payload, t0);
                        prop_assert_eq!(v, Verdict::Forged);
                    }
                    let _ = t.route(src.to_owned(), t0);
                }
                prop_assert!(t.route(proxy, t0).is_none());
            }
        }
    }
}
