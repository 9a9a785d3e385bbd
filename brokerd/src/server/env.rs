//! What the broker reads from the outside world besides sockets: the time and
//! unpredictable bytes. Injected into [`Server`](super::Server) (see
//! [`Server::bind_with`](super::Server::bind_with)) so that tests drive leases,
//! deadlines and idle timeouts with a fake clock instead of sleeping, and get
//! connect ids they can predict.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use gcb_proto::Now;

/// The broker's clock: a monotonic instant for deadlines, and Unix milliseconds for
/// the freshness stamps of keyed control frames.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Now;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Now {
        Now {
            mono: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// The broker's source of unpredictable bytes: connect ids, punch nonces, the
/// endpoint's session number and an unkeyed broker's token secret.
pub trait Random {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// The kernel's random source (getrandom(2)).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        // getrandom only fails before the kernel's pool is initialised or on a bad
        // buffer; neither happens to a running daemon. Never hand out a predictable
        // id: abort instead.
        if let Err(e) = getrandom::fill(buf) {
            panic!("getrandom failed: {e}");
        }
    }
}
