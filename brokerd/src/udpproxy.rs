//! The UDP data plane: proxy UDP sockets of UDP registrations, and the
//! relay between regular senders and the listener (paper 4.2.2, frames in
//! [`gcb_proto::udp`]).
//!
//! Every datagram arriving at a proxy socket is classified by its source:
//!
//! * from the listener's **data address** (the source of the last good
//!   `Dummy`): a `Dummy` keepalive (token checked, answered `DummyAck`) or
//!   a `To` frame, sent unwrapped to its destination if that destination
//!   has a live relay rule on this proxy; anything else is dropped
//!   (`not_frame`, `bad_token`, `no_rule`);
//! * from anywhere else, a `Dummy` frame: with the right token it sets or
//!   moves the data address (NAT remapping) and is acked, else `bad_token`;
//!   other GCBU frames are dropped (`stray`): the broker only ever sends
//!   those, never relays them;
//! * anything else is a **sender datagram**: its relay rule is renewed or
//!   created ([`crate::udprules`]) and it goes to the data address wrapped
//!   in a `From` frame. Dropped when there is no data address yet
//!   (`no_listener`), the table is full (`table_full`, a rate-limited log
//!   line) or it is too big to wrap (`too_big`).
//!
//! Hole punching (GCB <-> GCB, [`gcb_proto::punch`]): [`UdpPlane::punch_pair`]
//! hands out both sides' data addresses and remembers the pairing on both
//! registrations (at most [`MAX_PUNCHED`] each, oldest forgotten first; none
//! for a registration that never punched), so that when one goes away
//! ([`UdpPlane::remove`]) the other's shim can be told (`punch_end`) to drop
//! its direct record before another program takes the gone side's address.
//!
//! Datagrams are received into one fixed buffer at offset
//! [`UDP_HEADER_LEN`], so wrapping writes the header in front of the
//! payload in place: no per-datagram allocation or copy.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use tracing::{debug, info, warn};

use gcb_proto::ErrorCode;
use std::time::{Duration, Instant};

use gcb_proto::udp::{self, UdpKind, MAX_UDP_PAYLOAD, UDP_HEADER_LEN, UDP_TOKEN_LEN};
use mio::net::UdpSocket;
use mio::Token;

use crate::udprules::{Full, RuleLimits, RuleTable, Touch};

/// Datagrams handled per proxy socket before the loop serves others (the
/// rest is drained on the next turn of the event loop).
pub const DRAIN_BUDGET: usize = 256;

/// Most pairings remembered per registration (two IPv4 addresses each: at
/// most 1 KiB per registration). A registration punched with more peers
/// forgets the oldest; their records end by the shim's own rules (relayed
/// datagram, failed check, idle).
pub const MAX_PUNCHED: usize = 64;

/// Largest datagram received (anything longer is truncated by the kernel,
/// and is too big for a frame anyway).
const RECV_MAX: usize = 65_535;

/// One UDP registration's proxy socket.
pub struct UdpProxy {
    /// The socket (bound on the listen IP).
    pub sock: UdpSocket,
    /// Its poll token.
    pub token: Token,
    /// The Dummy token: the registration token presented for UDP Dummy frames
    /// ([`gcb_proto::token`]), ASCII lowercase hex.
    pub secret: [u8; UDP_TOKEN_LEN],
    /// The registration's observed IP: Dummy frames count only from there (a token read
    /// off the wire and replayed from elsewhere must not move the data address).
    pub owner_ip: std::net::IpAddr,
    /// Where the listener's frames come from and `From` frames go (the NAT
    /// mapping of the program's socket toward the proxy), once a Dummy
    /// arrived.
    pub data: Option<SocketAddr>,
    /// The listener's local address (for log lines).
    pub local: SocketAddr,
    /// The registrations `punch_pair` paired this one with, oldest first (at most
    /// [`MAX_PUNCHED`]; empty, without an allocation, for most registrations).
    pub punched: Vec<Punched>,
}

/// One pairing of a registration by [`UdpPlane::punch_pair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Punched {
    /// The other registration's proxy.
    pub partner: SocketAddrV4,
    /// This registration's data address as handed to the partner: the partner's
    /// record key for us when we initiated the punch (a NAT remapping since does
    /// not change that key). When the partner initiated, its key is our proxy.
    pub data: SocketAddrV4,
}

/// A `punch_end` to send: tell the registrant of `to` that the registration
/// with data address `peer` and proxy `peer_proxy` is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchEnd {
    /// The partner's proxy (its registration).
    pub to: SocketAddr,
    /// The gone registration's data address, as handed to the partner.
    pub peer: SocketAddrV4,
    /// The gone registration's proxy.
    pub peer_proxy: SocketAddrV4,
}

impl UdpProxy {
    /// The Dummy token as a string.
    pub fn token_string(&self) -> String {
        String::from_utf8_lossy(&self.secret).into_owned()
    }
}

/// Counters of the UDP data plane (printed in the stats line).
#[derive(Debug, Default, Clone)]
pub struct UdpCounters {
    /// Sender datagrams relayed to listeners (`From` frames sent).
    pub to_listener: u64,
    /// Their payload bytes.
    pub to_listener_bytes: u64,
    /// Listener datagrams relayed to senders (`To` frames honoured).
    pub from_listener: u64,
    /// Their payload bytes.
    pub from_listener_bytes: u64,
    /// Good Dummy frames (acked).
    pub dummies: u64,
    /// Dummy frames with a wrong or missing token.
    pub drop_bad_token: u64,
    /// Sender datagrams before the listener sent any Dummy.
    pub drop_no_listener: u64,
    /// `To` frames to a destination without a live rule.
    pub drop_no_rule: u64,
    /// New senders refused because the rule table is full (broker-wide or per proxy).
    pub drop_table_full: u64,
    /// New senders refused because their IP has its share of the proxy's rules.
    pub drop_sender_ip_full: u64,
    /// Datagrams from the data address that are not a Dummy or To frame.
    pub drop_not_frame: u64,
    /// GCBU frames other than Dummy from addresses other than the data
    /// address, and Dummies from the broker's own sockets.
    pub drop_stray: u64,
    /// Sender datagrams larger than [`MAX_UDP_PAYLOAD`].
    pub drop_too_big: u64,
    /// Sends that failed (full socket buffer, unreachable...).
    pub send_errors: u64,
    /// Hole punches brokered (`punch_request` answered `punch`).
    pub punches: u64,
    /// `punch_request`s refused (unknown proxy, bad token, no data address).
    pub punch_refused: u64,
    /// `punch_back`s the destination did not acknowledge.
    pub punch_back_failures: u64,
    /// `punch_end`s sent (a paired registration went away).
    pub punch_ends: u64,
    /// `punch_end`s the partner did not acknowledge.
    pub punch_end_failures: u64,
}

/// Logs at most once per interval, counting what it suppressed.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        RateLimit {
            every,
            next: None,
            suppressed: 0,
        }
    }

    /// Some(lines suppressed since the last one) if a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Proxy sockets, rules, counters and the receive buffer.
pub struct UdpPlane {
    /// Proxy sockets by proxy address.
    proxies: HashMap<SocketAddr, UdpProxy>,
    /// The broker's own UDP addresses (control and proxies, as advertised): a Dummy
    /// from one of them would make a relay loop, so it is dropped.
    own: HashSet<SocketAddr>,
    /// Other IPs the broker's own datagrams may come from (behind a 1:1 NAT, one of
    /// its proxies sending to another's advertised address hairpins back from the
    /// host's private IP): the same ports at these IPs are ours too.
    own_aliases: Vec<IpAddr>,
    /// Relay rules.
    pub rules: RuleTable,
    /// Counters.
    pub counters: UdpCounters,
    buf: Box<[u8]>,
    full_log: RateLimit,
    drop_log: RateLimit,
}

/// " (N similar lines suppressed)" when N > 0.
fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar lines suppressed)")
    }
}

/// Whether `src` is one of the broker's own sockets: an advertised address in `own`, or
/// the same port at one of `aliases` (`advertised` is the broker's advertised IP).
fn is_own(
    own: &HashSet<SocketAddr>,
    aliases: &[IpAddr],
    advertised: IpAddr,
    src: SocketAddr,
) -> bool {
    own.contains(&src)
        || (aliases.contains(&src.ip()) && own.contains(&SocketAddr::new(advertised, src.port())))
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl UdpPlane {
    /// An empty plane.
    pub fn new(limits: RuleLimits, control: SocketAddr) -> Self {
        UdpPlane {
            proxies: HashMap::new(),
            own: HashSet::from([control]),
            own_aliases: Vec::new(),
            rules: RuleTable::new(limits),
            counters: UdpCounters::default(),
            buf: vec![0u8; UDP_HEADER_LEN + RECV_MAX].into_boxed_slice(),
            full_log: RateLimit::new(Duration::from_secs(1)),
            drop_log: RateLimit::new(Duration::from_secs(1)),
        }
    }

    /// Counts `ip` as one of the broker's own source IPs besides the advertised one
    /// (the IP its datagrams to the advertised address leave from, when they differ).
    pub fn add_own_alias(&mut self, ip: IpAddr) {
        if !self.own_aliases.contains(&ip) {
            self.own_aliases.push(ip);
        }
    }

    /// Adds a proxy socket (the caller registered it with the poller).
    pub fn insert(&mut self, proxy: SocketAddr, p: UdpProxy) {
        self.own.insert(proxy);
        self.proxies.insert(proxy, p);
    }

    /// The proxy socket at `proxy`.
    pub fn get(&self, proxy: &SocketAddr) -> Option<&UdpProxy> {
        self.proxies.get(proxy)
    }

    /// Every proxy socket (for `status`).
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &UdpProxy)> {
        self.proxies.iter()
    }

    /// Number of proxy sockets.
    pub fn len(&self) -> usize {
        self.proxies.len()
    }

    /// True when there are no proxy sockets.
    pub fn is_empty(&self) -> bool {
        self.proxies.is_empty()
    }

    /// Removes a proxy and its rules (the caller deregisters the socket), and
    /// its pairings from its partners' lists. Returns it and the `punch_end`s
    /// its partners need (the caller sends those to partners still registered).
    pub fn remove(&mut self, proxy: &SocketAddr) -> Option<(UdpProxy, Vec<PunchEnd>)> {
        let mut p = self.proxies.remove(proxy)?;
        self.own.remove(proxy);
        self.rules.remove_proxy(proxy);
        let SocketAddr::V4(gone) = *proxy else {
            return Some((p, Vec::new()));
        };
        let ends = std::mem::take(&mut p.punched)
            .into_iter()
            .map(|x| {
                let to = SocketAddr::V4(x.partner);
                if let Some(partner) = self.proxies.get_mut(&to) {
                    partner.punched.retain(|y| y.partner != gone);
                }
                PunchEnd {
                    to,
                    peer: x.data,
                    peer_proxy: gone,
                }
            })
            .collect();
        Some((p, ends))
    }

    /// Drains up to [`DRAIN_BUDGET`] datagrams from `proxy`'s socket.
    /// Returns true if the budget ran out (more may be waiting: call again
    /// on the next turn; edge-triggered readiness will not repeat).
    pub fn on_readable(&mut self, proxy: SocketAddr, now: Instant) -> bool {
        let UdpPlane {
            proxies,
            own,
            own_aliases,
            rules,
            counters,
            buf,
            full_log,
            drop_log,
        } = self;
        let Some(p) = proxies.get_mut(&proxy) else {
            return false;
        };
        for _ in 0..DRAIN_BUDGET {
            let (n, src) = match p.sock.recv_from(&mut buf[UDP_HEADER_LEN..]) {
                Ok(x) => x,
                Err(e) if would_block(&e) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Asynchronous errors (ICMP) are consumed by the call.
                    debug!("udp proxy {proxy}: recv: {e}");
                    continue;
                }
            };
            let from_listener = p.data == Some(src);
            let frame = &buf[UDP_HEADER_LEN..UDP_HEADER_LEN + n];
            let parsed = udp::parse(frame);
            match parsed {
                Some((kind @ (UdpKind::Dummy | UdpKind::KeepAlive), _, tok)) => {
                    if !udp::token_eq(tok, &p.secret)
                        || crate::decision::canonical(src.ip()) != p.owner_ip
                    {
                        counters.drop_bad_token += 1;
                        if let Some(s) = drop_log.allow(now) {
                            info!("udp proxy {proxy}: dropped Dummy with a wrong token or from a foreign address: {src}{}",
                                suppressed(s)
                            );
                        }
                        continue;
                    }
                    if is_own(own, own_aliases, proxy.ip(), src) {
                        counters.drop_stray += 1;
                        warn!("udp proxy {proxy}: dropped Dummy from broker socket {src}");
                        continue;
                    }
                    let SocketAddr::V4(src4) = src else {
                        counters.drop_stray += 1;
                        continue;
                    };
                    counters.dummies += 1;
                    match p.data {
                        Some(old) if old == src => {
                            debug!("udp proxy {proxy}: keepalive from {src}")
                        }
                        Some(old) => info!("udp proxy {proxy}: listener data address moved {old} -> {src} (local {})",
                            p.local
                        ),
                        None => info!("udp proxy {proxy}: listener data address {src} (local {})",
                            p.local
                        ),
                    }
                    p.data = Some(src);
                    if kind == UdpKind::KeepAlive {
                        continue; // no ack: the listener asked for none
                    }
                    let mut ack = [0u8; UDP_HEADER_LEN + UDP_TOKEN_LEN];
                    let len =
                        udp::write_frame(&mut ack, UdpKind::DummyAck, src4, &p.secret).unwrap_or(0);
                    if let Err(e) = p.sock.send_to(&ack[..len], src) {
                        counters.send_errors += 1;
                        debug!("udp proxy {proxy}: DummyAck to {src}: {e}");
                    }
                }
                Some((UdpKind::To, dest, payload)) if from_listener => {
                    let dest = SocketAddr::V4(dest);
                    if !rules.reply(proxy, dest, now) {
                        counters.drop_no_rule += 1;
                        if let Some(s) = drop_log.allow(now) {
                            info!("udp proxy {proxy}: dropped listener datagram to {dest}: no live relay rule{}",
                                suppressed(s)
                            );
                        }
                        continue;
                    }
                    let len = payload.len();
                    match p.sock.send_to(payload, dest) {
                        Ok(_) => {
                            counters.from_listener += 1;
                            counters.from_listener_bytes += len as u64;
                        }
                        Err(e) => {
                            counters.send_errors += 1;
                            debug!("udp proxy {proxy}: send to {dest}: {e}");
                        }
                    }
                }
                _ if from_listener => {
                    counters.drop_not_frame += 1;
                    if let Some(s) = drop_log.allow(now) {
                        info!("udp proxy {proxy}: dropped {n}-byte datagram from the listener ({src}): not a Dummy or To frame{}",
                            suppressed(s)
                        );
                    }
                }
                Some((kind, ..)) => {
                    counters.drop_stray += 1;
                    if let Some(s) = drop_log.allow(now) {
                        info!(
                            "udp proxy {proxy}: dropped stray {kind:?} frame from {src}{}",
                            suppressed(s)
                        );
                    }
                }
                None => {
                    // A sender datagram.
                    if n > MAX_UDP_PAYLOAD {
                        counters.drop_too_big += 1;
                        if let Some(s) = drop_log.allow(now) {
                            info!("udp proxy {proxy}: dropped {n}-byte datagram from {src}: larger than {MAX_UDP_PAYLOAD} cannot be relayed{}",
                                suppressed(s)
                            );
                        }
                        continue;
                    }
                    let SocketAddr::V4(src4) = src else {
                        counters.drop_stray += 1;
                        continue;
                    };
                    let Some(data) = p.data else {
                        counters.drop_no_listener += 1;
                        if let Some(s) = drop_log.allow(now) {
                            info!("udp proxy {proxy}: dropped datagram from {src}: the listener has not sent its Dummy yet{}",
                                suppressed(s)
                            );
                        }
                        continue;
                    };
                    match rules.touch(proxy, src, now) {
                        Touch::Live => {}
                        Touch::Created => {
                            debug!("udp proxy {proxy}: relay rule for {src}")
                        }
                        Touch::Full(why) => {
                            if matches!(why, Full::PerSenderIp(_)) {
                                counters.drop_sender_ip_full += 1;
                            } else {
                                counters.drop_table_full += 1;
                            }
                            if let Some(s) = full_log.allow(now) {
                                warn!(
                                    "udp proxy {proxy}: refused new sender {src}: {why}{}",
                                    suppressed(s)
                                );
                            }
                            continue;
                        }
                    }
                    buf[..UDP_HEADER_LEN].copy_from_slice(&udp::write_header(UdpKind::From, src4));
                    match p.sock.send_to(&buf[..UDP_HEADER_LEN + n], data) {
                        Ok(_) => {
                            counters.to_listener += 1;
                            counters.to_listener_bytes += n as u64;
                        }
                        Err(e) => {
                            counters.send_errors += 1;
                            debug!("udp proxy {proxy}: send to listener {data}: {e}");
                        }
                    }
                }
            }
        }
        true
    }

    /// The data addresses for a hole punch from the registrant of
    /// `from_proxy` (which proves it with its registration `token`) to the
    /// registrant of `proxy`: `(destination's, initiator's)`. Refusals are
    /// counted.
    pub fn punch_pair(
        &mut self,
        proxy: &SocketAddr,
        from_proxy: &SocketAddr,
        token: &str,
    ) -> Result<(SocketAddrV4, SocketAddrV4), (ErrorCode, String)> {
        let r = self.punch_pair_inner(proxy, from_proxy, token);
        match (&r, proxy, from_proxy) {
            (Ok((d, s)), SocketAddr::V4(p), SocketAddr::V4(f)) => {
                // Each side's record key for the other: see `Punched::data`.
                self.remember(
                    proxy,
                    Punched {
                        partner: *f,
                        data: *d,
                    },
                );
                self.remember(
                    from_proxy,
                    Punched {
                        partner: *p,
                        data: *s,
                    },
                );
            }
            (Ok(_), ..) => {}
            (Err(_), ..) => self.counters.punch_refused += 1,
        }
        r
    }

    /// Adds a pairing to `proxy`'s list (again: moved to the newest end).
    fn remember(&mut self, proxy: &SocketAddr, x: Punched) {
        let Some(p) = self.proxies.get_mut(proxy) else {
            return;
        };
        p.punched.retain(|y| *y != x);
        if p.punched.len() >= MAX_PUNCHED {
            p.punched.remove(0);
        }
        p.punched.push(x);
    }

    fn punch_pair_inner(
        &self,
        proxy: &SocketAddr,
        from_proxy: &SocketAddr,
        token: &str,
    ) -> Result<(SocketAddrV4, SocketAddrV4), (ErrorCode, String)> {
        let Some(dest) = self.proxies.get(proxy) else {
            return Err((
                ErrorCode::NoSuchRegistration,
                format!("{proxy} is not a udp proxy"),
            ));
        };
        let src = self
            .proxies
            .get(from_proxy)
            .filter(|s| udp::token_eq(token.as_bytes(), &s.secret))
            .ok_or_else(|| {
                (
                    ErrorCode::NotOwner,
                    format!("{from_proxy}: unknown proxy or wrong token"),
                )
            })?;
        if proxy == from_proxy {
            return Err((
                ErrorCode::BadRequest,
                "a socket does not punch to itself".into(),
            ));
        }
        match (dest.data, src.data) {
            (Some(SocketAddr::V4(d)), Some(SocketAddr::V4(s))) => Ok((d, s)),
            _ => Err((
                ErrorCode::Busy,
                "no data address yet (no keepalive arrived)".into(),
            )),
        }
    }

    /// Removes dead rules (called by the sweep).
    pub fn sweep(&mut self, now: Instant) {
        for (proxy, sender) in self.rules.expire(now) {
            debug!("udp proxy {proxy}: relay rule for {sender} expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// A plane with UDP registrations at `proxies` (their sockets are real but unused),
    /// each with token `"0"*31 + i` and data address 203.0.113.(i+1):9000.
    fn plane(proxies: &[SocketAddrV4]) -> UdpPlane {
        let mut u = UdpPlane::new(
            RuleLimits {
                idle: Duration::from_secs(60),
                max_total: 16,
                max_per_proxy: 16,
                max_per_sender_ip: 16,
            },
            "203.0.113.10:9650".parse().unwrap(),
        );
        for (i, p) in proxies.iter().enumerate() {
            let mut secret = [b'0'; UDP_TOKEN_LEN];
            secret[UDP_TOKEN_LEN - 1] = b'0' + i as u8;
            u.insert(
                SocketAddr::V4(*p),
                UdpProxy {
                    sock: UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
                    token: Token(i),
                    secret,
                    owner_ip: "203.0.113.1".parse().unwrap(),
                    data: Some(SocketAddr::V4(data_of(i))),
                    local: "10.1.0.5:9000".parse().unwrap(),
                    punched: Vec::new(),
                },
            );
        }
        u
    }

    fn data_of(i: usize) -> SocketAddrV4 {
        SocketAddrV4::new([203, 0, 113, 1 + i as u8].into(), 9000)
    }

    fn pair(u: &mut UdpPlane, proxies: &[SocketAddrV4], dest: usize, from: usize) {
        let token = u.proxies[&SocketAddr::V4(proxies[from])].token_string();
        let r = u.punch_pair(
            &SocketAddr::V4(proxies[dest]),
            &SocketAddr::V4(proxies[from]),
            &token,
        );
        assert_eq!(r, Ok((data_of(dest), data_of(from))));
    }

    #[test]
    fn a_gone_registration_ends_its_partners_punches() {
        let ps = [
            v4("203.0.113.10:40001"),
            v4("203.0.113.10:40002"),
            v4("203.0.113.10:40003"),
        ];
        let mut u = plane(&ps);
        // 1 punches to 0 (twice: remembered once), 2 punches to 1; refusals remember nothing.
        pair(&mut u, &ps, 0, 1);
        pair(&mut u, &ps, 0, 1);
        pair(&mut u, &ps, 1, 2);
        assert!(u
            .punch_pair(&SocketAddr::V4(ps[1]), &SocketAddr::V4(ps[0]), "bad")
            .is_err());
        assert_eq!(u.counters.punch_refused, 1);
        let punched = |u: &UdpPlane, i: usize| u.proxies[&SocketAddr::V4(ps[i])].punched.clone();
        assert_eq!(punched(&u, 0).len(), 1);
        assert_eq!(punched(&u, 1).len(), 2);
        // The registration in the middle goes: each partner hears of it under the keys
        // it uses (the destination 0: 1's data address; the initiator 2: 1's proxy).
        let (gone, mut ends) = u.remove(&SocketAddr::V4(ps[1])).unwrap();
        assert!(gone.punched.is_empty(), "taken");
        ends.sort_by_key(|e| e.to);
        assert_eq!(
            ends,
            vec![
                PunchEnd {
                    to: SocketAddr::V4(ps[0]),
                    peer: data_of(1),
                    peer_proxy: ps[1],
                },
                PunchEnd {
                    to: SocketAddr::V4(ps[2]),
                    peer: data_of(1),
                    peer_proxy: ps[1],
                },
            ]
        );
        // ...and is no longer in their lists: nothing more when they go.
        assert!(punched(&u, 0).is_empty());
        assert!(punched(&u, 2).is_empty());
        assert_eq!(u.remove(&SocketAddr::V4(ps[0])).unwrap().1, vec![]);
        assert!(u.remove(&SocketAddr::V4(ps[0])).is_none());
    }

    #[test]
    fn pairings_per_registration_are_bounded_oldest_forgotten() {
        let hub = v4("203.0.113.10:40000");
        let mut ps = vec![hub];
        ps.extend(
            (1..=MAX_PUNCHED as u16 + 2)
                .map(|i| SocketAddrV4::new([203, 0, 113, 10].into(), 40000 + i)),
        );
        let mut u = plane(&ps);
        for i in 1..ps.len() {
            pair(&mut u, &ps, 0, i);
        }
        let list = &u.proxies[&SocketAddr::V4(hub)].punched;
        assert_eq!(list.len(), MAX_PUNCHED);
        assert_eq!(list[0].partner, ps[3], "the two oldest are forgotten");
        assert_eq!(list[MAX_PUNCHED - 1].partner, ps[ps.len() - 1]);
        assert!(
            std::mem::size_of::<Punched>() * MAX_PUNCHED <= 1024,
            "the bound the docs state"
        );
        let (_, ends) = u.remove(&SocketAddr::V4(hub)).unwrap();
        assert_eq!(ends.len(), MAX_PUNCHED);
        assert!(ends
            .iter()
            .all(|e| e.peer == data_of(0) && e.peer_proxy == hub));
    }

    #[test]
    fn rate_limit_counts_suppressed_lines() {
        let mut r = RateLimit::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t + Duration::from_millis(10)), None);
        assert_eq!(r.allow(t + Duration::from_millis(999)), None);
        assert_eq!(r.allow(t + Duration::from_millis(1000)), Some(2));
        assert_eq!(r.allow(t + Duration::from_millis(2500)), Some(0));
        assert_eq!(suppressed(0), "");
        assert_eq!(suppressed(3), " (3 similar lines suppressed)");
    }
}

#[cfg(test)]
mod own_tests {
    use super::*;

    /// Behind a 1:1 NAT the broker's own proxy sends to another proxy's advertised
    /// address and the datagram hairpins back from the host's private IP: that source is
    /// ours too, while the same IP at a port that is not ours is a stranger.
    #[test]
    fn own_sockets_are_recognised_at_their_alias_ip() {
        let advertised: IpAddr = "203.0.113.20".parse().unwrap();
        let own = HashSet::from([
            SocketAddr::new(advertised, 9650),
            SocketAddr::new(advertised, 40000),
        ]);
        let aliases = ["10.3.0.11".parse().unwrap()];
        let is = |s: &str| is_own(&own, &aliases, advertised, s.parse().unwrap());
        assert!(is("203.0.113.20:40000"));
        assert!(is("10.3.0.11:40000"));
        assert!(is("10.3.0.11:9650"));
        assert!(!is("10.3.0.11:40001"));
        assert!(!is("10.3.0.12:40000"));
        assert!(!is("203.0.113.21:40000"));
    }
}
