//! Pairs of public IPs between which TCP hole punching failed recently: the broker
//! decides the relay at once for them instead of making the connector wait for a punch
//! that will fail again (a hard NAT, a firewall dropping inbound SYNs, a router answering
//! them with a reset). Pure: time comes in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a failed pair is remembered.
pub const FAILED_FOR: Duration = Duration::from_secs(300);
/// Most pairs remembered (expired ones go first, then the oldest).
pub const MAX_PAIRS: usize = 65_536;

/// The remembered failures, keyed by the unordered pair of IPs.
#[derive(Debug, Default)]
pub struct PunchMemo {
    failed: HashMap<(IpAddr, IpAddr), Instant>,
}

fn key(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl PunchMemo {
    /// Nothing remembered.
    pub fn new() -> Self {
        Self::default()
    }

    /// A punch between `a` and `b` failed at `now`.
    pub fn failed(&mut self, a: IpAddr, b: IpAddr, now: Instant) {
        if self.failed.len() >= MAX_PAIRS {
            self.failed.retain(|_, until| *until > now);
            if self.failed.len() >= MAX_PAIRS {
                if let Some(oldest) = self.failed.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                    self.failed.remove(&oldest);
                }
            }
        }
        self.failed.insert(key(a, b), now + FAILED_FOR);
    }

    /// A punch between `a` and `b` worked: forget an old failure.
    pub fn worked(&mut self, a: IpAddr, b: IpAddr) {
        self.failed.remove(&key(a, b));
    }

    /// Did a punch between `a` and `b` fail within [`FAILED_FOR`] of `now`?
    pub fn recently_failed(&self, a: IpAddr, b: IpAddr, now: Instant) -> bool {
        self.failed
            .get(&key(a, b))
            .is_some_and(|until| *until > now)
    }

    /// Pairs remembered (for `status`).
    pub fn len(&self) -> usize {
        self.failed.len()
    }

    /// Nothing remembered?
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_unordered_pairs_for_a_while() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
            "203.0.113.3".parse().unwrap(),
        );
        let t = Instant::now();
        let mut m = PunchMemo::new();
        m.failed(a, b, t);
        assert!(m.recently_failed(b, a, t + Duration::from_secs(1)));
        assert!(!m.recently_failed(a, c, t));
        assert!(!m.recently_failed(a, b, t + FAILED_FOR));
        m.worked(b, a);
        assert!(!m.recently_failed(a, b, t));
    }

    #[test]
    fn bounded() {
        let t = Instant::now();
        let mut m = PunchMemo::new();
        for i in 0..(MAX_PAIRS as u32 + 5) {
            let a = IpAddr::from(i.to_be_bytes());
            m.failed(
                a,
                "203.0.113.1".parse().unwrap(),
                t + Duration::from_micros(i.into()),
            );
        }
        assert!(m.len() <= MAX_PAIRS);
    }
}
