//! Per-source-IP control-request rate limit: a token bucket per IP.
//!
//! Limits are per IP, not per IP:port: one host gets a new source port for
//! free, so a per-address limit is no limit. Pure bookkeeping, time comes in
//! as arguments.
//!
//! Memory is bounded: at most `max_ips` buckets. A bucket that has refilled to
//! its burst carries no information and is dropped when room is needed; if
//! every tracked IP is still throttled, new IPs share one overflow bucket
//! (an attacker spraying spoofed sources then competes only with itself and
//! other unknown sources, never with the IPs already tracked).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// One token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets per source IP.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// Bucket size.
    burst: f64,
    max_ips: usize,
    buckets: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
}

impl RateLimiter {
    /// `rate` datagrams per second sustained, `burst` at once, per IP; `rate`
    /// 0 disables the limit.
    pub fn new(rate: u32, burst: u32, max_ips: usize) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_ips: max_ips.max(1),
            buckets: HashMap::new(),
            overflow: None,
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * self.rate).min(self.burst);
        b.last = now;
    }

    /// Takes one token for `ip`; false: over the limit, drop the datagram.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let fresh = Bucket {
            tokens: self.burst,
            last: now,
        };
        let known = self.buckets.get(&ip).copied();
        let mut b = match known {
            Some(b) => b,
            None if self.buckets.len() < self.max_ips || self.make_room(now) => fresh,
            None => {
                let mut o = self.overflow.unwrap_or(fresh);
                self.refill(&mut o, now);
                let ok = take(&mut o);
                self.overflow = Some(o);
                return ok;
            }
        };
        self.refill(&mut b, now);
        let ok = take(&mut b);
        self.buckets.insert(ip, b);
        ok
    }

    /// Drops buckets that have refilled completely; true if there is room now.
    fn make_room(&mut self, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + dt * rate < burst
        });
        self.buckets.len() < self.max_ips
    }

    /// IPs tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no IP is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn take(b: &mut Bucket) -> bool {
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_rate_per_ip() {
        let mut r = RateLimiter::new(10, 5, 100);
        let t = Instant::now();
        let a = ip("203.0.113.11");
        assert_eq!((0..8).filter(|_| r.allow(a, t)).count(), 5);
        // Another IP has its own bucket.
        assert!(r.allow(ip("203.0.113.12"), t));
        // 10/s: 200 ms later, two more.
        let t2 = t + Duration::from_millis(200);
        assert_eq!((0..5).filter(|_| r.allow(a, t2)).count(), 2);
    }

    #[test]
    fn bounded_with_overflow_bucket() {
        let mut r = RateLimiter::new(1, 2, 2);
        let t = Instant::now();
        assert!(r.allow(ip("10.0.0.1"), t));
        assert!(r.allow(ip("10.0.0.2"), t));
        // Full of throttled IPs: newcomers share the overflow bucket (burst 2).
        assert!(r.allow(ip("10.0.0.3"), t));
        assert!(r.allow(ip("10.0.0.4"), t));
        assert!(!r.allow(ip("10.0.0.5"), t));
        assert_eq!(r.len(), 2);
        // Once the tracked buckets refilled, they make room.
        let later = t + Duration::from_secs(5);
        assert!(r.allow(ip("10.0.0.5"), later));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn zero_rate_disables() {
        let mut r = RateLimiter::new(0, 1, 1);
        let t = Instant::now();
        assert!((0..1000).all(|_| r.allow(ip("10.0.0.1"), t)));
        assert!(r.is_empty());
    }
}
