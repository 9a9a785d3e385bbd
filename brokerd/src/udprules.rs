//! UDP relay rules (paper 4.2.2): which senders may currently talk to a UDP
//! listener through its proxy, and be answered through it.
//!
//! A rule is (proxy, sender address) plus the time it was last used. A
//! sender's datagram to the proxy creates or renews its rule; a reply the
//! listener sends to that sender (a `To` frame) is allowed only while the
//! rule is live, and renews it too ("no packet is relayed using the rule
//! for a long time" is what expires it). A rule idle for `idle` is dead at
//! once, whether or not the sweep has removed it yet; traffic after that
//! creates a new rule.
//!
//! The table is bounded globally, per proxy, and per (proxy, sender IP): one host
//! spraying datagrams from thousands of source ports gets at most
//! `max_per_sender_ip` rules on a proxy, so it cannot fill the proxy's table
//! for everyone else. When a bound is reached a
//! *new* sender is refused; live rules are never evicted to make room
//! (dead ones are purged first).
//!
//! Pure bookkeeping, no sockets; time comes in as arguments.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Table limits.
#[derive(Debug, Clone, Copy)]
pub struct RuleLimits {
    /// A rule unused for this long is dead (`--udp-rule-idle-ms`).
    pub idle: Duration,
    /// Most rules broker-wide (`--max-udp-rules`).
    pub max_total: usize,
    /// Most rules per proxy (`--max-udp-rules-per-proxy`).
    pub max_per_proxy: usize,
    /// Most rules per proxy from one sender IP (`--max-udp-rules-per-sender-ip`).
    pub max_per_sender_ip: usize,
}

/// Which limit refused a new sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The broker-wide limit.
    Total(usize),
    /// The per-proxy limit.
    PerProxy(usize),
    /// The per-proxy limit for one sender IP.
    PerSenderIp(usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "broker-wide udp rule limit ({n}) reached"),
            Full::PerProxy(n) => write!(f, "per-proxy udp rule limit ({n}) reached"),
            Full::PerSenderIp(n) => {
                write!(f, "udp rule limit per proxy and sender IP ({n}) reached")
            }
        }
    }
}

/// Outcome of a sender datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The sender had a live rule; renewed.
    Live,
    /// A new rule was created (first datagram, or the old rule had expired).
    Created,
    /// No room for a new rule: drop the datagram.
    Full(Full),
}

/// The rule table.
#[derive(Debug)]
pub struct RuleTable {
    limits: RuleLimits,
    /// proxy -> sender -> last use.
    by_proxy: HashMap<SocketAddr, HashMap<SocketAddr, Instant>>,
    /// (proxy, sender IP) -> rules.
    per_ip: HashMap<(SocketAddr, IpAddr), usize>,
    total: usize,
    /// No rule can be dead before this instant (a lower bound on the
    /// earliest `last + idle`), so sweeps before it need not scan.
    no_expiry_before: Option<Instant>,
    /// Rules created so far.
    pub created: u64,
    /// Rules that expired so far (removed by a sweep or replaced by a new
    /// rule for the same sender).
    pub expired: u64,
}

impl RuleTable {
    /// An empty table.
    pub fn new(limits: RuleLimits) -> Self {
        RuleTable {
            limits,
            by_proxy: HashMap::new(),
            per_ip: HashMap::new(),
            total: 0,
            no_expiry_before: None,
            created: 0,
            expired: 0,
        }
    }

    /// Applies new limits (a reload): they bind new rules and the next expiries; rules
    /// beyond a lowered cap are kept until they expire.
    pub fn set_limits(&mut self, limits: RuleLimits) {
        self.limits = limits;
    }

    /// The configured limits.
    pub fn limits(&self) -> RuleLimits {
        self.limits
    }

    /// Rules in the table (live, or dead and not yet swept).
    pub fn len(&self) -> usize {
        self.total
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Rules of one proxy (live, or dead and not yet swept).
    pub fn len_for(&self, proxy: &SocketAddr) -> usize {
        self.by_proxy.get(proxy).map_or(0, HashMap::len)
    }

    fn alive(&self, last: Instant, now: Instant) -> bool {
        now < last + self.limits.idle
    }

    /// A datagram from `sender` arrived at `proxy`: renew or create its rule.
    pub fn touch(&mut self, proxy: SocketAddr, sender: SocketAddr, now: Instant) -> Touch {
        let idle = self.limits.idle;
        if let Some(last) = self
            .by_proxy
            .get_mut(&proxy)
            .and_then(|m| m.get_mut(&sender))
        {
            let was_live = now < *last + idle;
            *last = now;
            if was_live {
                return Touch::Live;
            }
            // Dead but not swept yet: a new rule in the same slot.
            self.expired += 1;
            self.created += 1;
            return Touch::Created;
        }
        if let Some(full) = self.full(&proxy, sender.ip()) {
            // Make room from dead rules only, then look again.
            self.expire(now);
            if self.full(&proxy, sender.ip()).is_some() {
                return Touch::Full(full);
            }
        }
        self.by_proxy.entry(proxy).or_default().insert(sender, now);
        *self.per_ip.entry((proxy, sender.ip())).or_insert(0) += 1;
        self.total += 1;
        self.created += 1;
        if self.no_expiry_before.is_none() {
            self.no_expiry_before = Some(now + idle);
        }
        Touch::Created
    }

    fn full(&self, proxy: &SocketAddr, ip: IpAddr) -> Option<Full> {
        if self.total >= self.limits.max_total {
            Some(Full::Total(self.limits.max_total))
        } else if self.len_for(proxy) >= self.limits.max_per_proxy {
            Some(Full::PerProxy(self.limits.max_per_proxy))
        } else if self.per_ip.get(&(*proxy, ip)).copied().unwrap_or(0)
            >= self.limits.max_per_sender_ip
        {
            Some(Full::PerSenderIp(self.limits.max_per_sender_ip))
        } else {
            None
        }
    }

    fn forget_ip(&mut self, proxy: SocketAddr, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&(proxy, ip)) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&(proxy, ip));
            }
        }
    }

    /// The listener wants to send to `dest` through `proxy`: allowed only
    /// while `dest` has a live rule there, which this renews.
    pub fn reply(&mut self, proxy: SocketAddr, dest: SocketAddr, now: Instant) -> bool {
        let idle = self.limits.idle;
        match self.by_proxy.get_mut(&proxy).and_then(|m| m.get_mut(&dest)) {
            Some(last) if now < *last + idle => {
                *last = now;
                true
            }
            _ => false,
        }
    }

    /// Whether `sender` has a live rule on `proxy` (no renewal).
    pub fn is_live(&self, proxy: &SocketAddr, sender: &SocketAddr, now: Instant) -> bool {
        self.by_proxy
            .get(proxy)
            .and_then(|m| m.get(sender))
            .is_some_and(|&last| self.alive(last, now))
    }

    /// Removes every dead rule; returns them as (proxy, sender). Cheap when
    /// nothing can have expired yet.
    pub fn expire(&mut self, now: Instant) -> Vec<(SocketAddr, SocketAddr)> {
        let mut dead = Vec::new();
        match self.no_expiry_before {
            None => return dead,
            Some(t) if now < t => return dead,
            Some(_) => {}
        }
        let idle = self.limits.idle;
        let mut earliest: Option<Instant> = None;
        self.by_proxy.retain(|proxy, senders| {
            senders.retain(|sender, last| {
                let end = *last + idle;
                if now < end {
                    earliest = Some(earliest.map_or(end, |e| e.min(end)));
                    true
                } else {
                    dead.push((*proxy, *sender));
                    false
                }
            });
            !senders.is_empty()
        });
        for (proxy, sender) in &dead {
            self.forget_ip(*proxy, sender.ip());
        }
        self.total -= dead.len();
        self.expired += dead.len() as u64;
        self.no_expiry_before = earliest;
        dead
    }

    /// Drops every rule of `proxy` (its registration ended); returns how
    /// many there were.
    pub fn remove_proxy(&mut self, proxy: &SocketAddr) -> usize {
        let n = self.by_proxy.remove(proxy).map_or(0, |m| m.len());
        self.per_ip.retain(|(p, _), _| p != proxy);
        self.total -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn table(idle_ms: u64, max_total: usize, max_per_proxy: usize) -> RuleTable {
        RuleTable::new(RuleLimits {
            idle: Duration::from_millis(idle_ms),
            max_total,
            max_per_proxy,
            max_per_sender_ip: usize::MAX,
        })
    }

    #[test]
    fn one_sender_ip_cannot_fill_a_proxy() {
        let mut t = RuleTable::new(RuleLimits {
            idle: Duration::from_millis(1000),
            max_total: 100,
            max_per_proxy: 10,
            max_per_sender_ip: 3,
        });
        let t0 = Instant::now();
        let p = a(P1);
        let spray: Vec<Touch> = (1..=6)
            .map(|port| t.touch(p, a(&format!("198.51.100.7:{port}")), t0))
            .collect();
        assert_eq!(spray.iter().filter(|x| **x == Touch::Created).count(), 3);
        assert_eq!(spray[5], Touch::Full(Full::PerSenderIp(3)));
        // Another host still gets in; the same host on another proxy too.
        assert_eq!(t.touch(p, a("198.51.100.8:1"), t0), Touch::Created);
        assert_eq!(t.touch(a(P2), a("198.51.100.7:9"), t0), Touch::Created);
        // When the sprayer's rules die, its budget comes back.
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(t.touch(p, a("198.51.100.7:99"), later), Touch::Created);
        assert_eq!(t.remove_proxy(&p), 1);
        assert!(t.per_ip.keys().all(|(x, _)| *x != p));
    }

    const P1: &str = "203.0.113.10:40001";
    const P2: &str = "203.0.113.10:40002";

    #[test]
    fn create_renew_and_reply() {
        let mut t = table(1000, 10, 10);
        let t0 = Instant::now();
        let (p, s) = (a(P1), a("198.51.100.7:5000"));
        assert!(!t.reply(p, s, t0), "no rule yet: the listener cannot send");
        assert_eq!(t.touch(p, s, t0), Touch::Created);
        assert_eq!(t.touch(p, s, t0 + Duration::from_millis(500)), Touch::Live);
        // Renewed at +500: still live at +1400.
        assert!(t.reply(p, s, t0 + Duration::from_millis(1400)));
        // Renewed by the reply at +1400: live at +2300.
        assert!(t.is_live(&p, &s, t0 + Duration::from_millis(2300)));
        // The rule belongs to the proxy: the same sender on P2 has none.
        assert!(!t.reply(a(P2), s, t0));
        assert_eq!(t.len(), 1);
        assert_eq!(t.created, 1);
    }

    #[test]
    fn idle_rules_expire_and_traffic_recreates_them() {
        let mut t = table(1000, 10, 10);
        let t0 = Instant::now();
        let (p, s1, s2) = (a(P1), a("198.51.100.7:5000"), a("198.51.100.8:5000"));
        t.touch(p, s1, t0);
        t.touch(p, s2, t0 + Duration::from_millis(600));
        // Nothing can have expired before t0 + 1 s: no scan, nothing dead.
        assert!(t.expire(t0 + Duration::from_millis(999)).is_empty());
        // s1 is dead at +1000 even before any sweep.
        assert!(!t.reply(p, s1, t0 + Duration::from_millis(1000)));
        assert!(t.reply(p, s2, t0 + Duration::from_millis(1000)));
        assert_eq!(t.expire(t0 + Duration::from_millis(1000)), vec![(p, s1)]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.expired, 1);
        // s2 was renewed by the reply at +1000: alive until +2000.
        assert!(t.expire(t0 + Duration::from_millis(1999)).is_empty());
        assert_eq!(t.expire(t0 + Duration::from_millis(2000)), vec![(p, s2)]);
        assert!(t.is_empty());
        assert_eq!(t.len_for(&p), 0);
        // Traffic resumes: a new rule.
        assert_eq!(t.touch(p, s1, t0 + Duration::from_secs(5)), Touch::Created);
        assert!(t.reply(p, s1, t0 + Duration::from_secs(5)));
        assert_eq!(t.created, 3);
    }

    #[test]
    fn dead_unswept_rule_is_recreated() {
        let mut t = table(1000, 10, 10);
        let t0 = Instant::now();
        let (p, s) = (a(P1), a("198.51.100.7:5000"));
        t.touch(p, s, t0);
        assert_eq!(t.touch(p, s, t0 + Duration::from_secs(2)), Touch::Created);
        assert_eq!((t.created, t.expired, t.len()), (2, 1, 1));
        assert!(t.expire(t0 + Duration::from_millis(2500)).is_empty());
    }

    #[test]
    fn per_proxy_limit_refuses_new_senders_only() {
        let mut t = table(1000, 100, 2);
        let t0 = Instant::now();
        let p = a(P1);
        let s: Vec<SocketAddr> = (1..=3)
            .map(|i| a(&format!("198.51.100.{i}:5000")))
            .collect();
        assert_eq!(t.touch(p, s[0], t0), Touch::Created);
        assert_eq!(t.touch(p, s[1], t0), Touch::Created);
        assert_eq!(t.touch(p, s[2], t0), Touch::Full(Full::PerProxy(2)));
        // Old senders keep working; nothing was evicted.
        assert_eq!(
            t.touch(p, s[0], t0 + Duration::from_millis(10)),
            Touch::Live
        );
        assert!(t.reply(p, s[1], t0 + Duration::from_millis(10)));
        // Another proxy has its own budget.
        assert_eq!(t.touch(a(P2), s[2], t0), Touch::Created);
        // s[0] stays busy; s[1] goes quiet.
        assert_eq!(
            t.touch(p, s[0], t0 + Duration::from_millis(500)),
            Touch::Live
        );
        assert_eq!(
            t.touch(p, s[2], t0 + Duration::from_millis(1005)),
            Touch::Full(Full::PerProxy(2)),
            "both rules still live"
        );
        // Once a rule is dead, there is room again (purged on demand).
        assert_eq!(
            t.touch(p, s[2], t0 + Duration::from_millis(1015)),
            Touch::Created
        );
        assert!(!t.is_live(&p, &s[1], t0 + Duration::from_millis(1015)));
        assert!(t.is_live(&p, &s[0], t0 + Duration::from_millis(1015)));
        assert_eq!(t.expired, 2, "s[1] on P1 and s[2] on P2 were purged");
        assert_eq!(t.len_for(&p), 2);
    }

    #[test]
    fn global_limit() {
        let mut t = table(1000, 2, 10);
        let t0 = Instant::now();
        let s = a("198.51.100.7:5000");
        assert_eq!(t.touch(a(P1), s, t0), Touch::Created);
        assert_eq!(t.touch(a(P2), s, t0), Touch::Created);
        assert_eq!(
            t.touch(a("203.0.113.10:40003"), s, t0),
            Touch::Full(Full::Total(2))
        );
        assert_eq!(t.remove_proxy(&a(P1)), 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.touch(a("203.0.113.10:40003"), s, t0), Touch::Created);
        assert_eq!(t.remove_proxy(&a(P1)), 0);
    }

    #[test]
    fn many_rules_expire_in_one_sweep() {
        let mut t = table(50, 10_000, 10_000);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            let s = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1000));
            assert_eq!(
                t.touch(a(P1), s, t0 + Duration::from_micros(u64::from(i))),
                Touch::Created
            );
        }
        assert_eq!(t.expire(t0 + Duration::from_millis(49)).len(), 0);
        let dead = t.expire(t0 + Duration::from_millis(60));
        assert_eq!(dead.len(), 5000);
        assert!(t.is_empty());
        assert_eq!(t.expired, 5000);
    }
}
