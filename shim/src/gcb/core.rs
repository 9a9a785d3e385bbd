//! [`GcbLayer`]: the GCB client behind its fork-safe lock, and the two ways the
//! asynchronous event handler (AEH) is entered: [`GcbLayer::pump`] (run it now) and
//! `aeh` (what a wait must watch). The layer's features add their own `impl GcbLayer`
//! blocks in [`super::tcp`], [`super::wait`], [`super::udp`] and [`super::udp_epoll`];
//! [`super`] implements the [`crate::layer::Layer`] trait by dispatching to them.

use libc::c_int;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use super::client::Client;
use crate::fdtable::FdEntry;
use crate::forklock::ForkMutex;
use crate::net;
use crate::sockstate::GcbSock;

/// Default broker control port (UDP; the relay is TCP on the same port).
pub const DEFAULT_BROKER_PORT: u16 = 9650;

/// The GCB client layer.
pub struct GcbLayer {
    pub(super) client: ForkMutex<Client>,
}

/// Parses `GCB_BROKER` (`IP[:PORT]`, IPv4 only for now).
pub fn parse_broker(s: &str) -> Result<SocketAddrV4, gcb_proto::addr::AddrError> {
    gcb_proto::addr::parse_endpoint_v4(s, DEFAULT_BROKER_PORT)
}

/// A GCB TCP socket's addresses, if it is one.
pub(super) fn gcb_state(entry: &FdEntry) -> Option<GcbSock> {
    entry.with_state(|s| s.gcb()).flatten()
}

/// A program-side deadline from a poll-style timeout (ms, -1 infinite, -2: use `ts`).
pub(super) fn deadline_of(timeout_ms: c_int, ts: *const libc::timespec) -> Option<Instant> {
    let d = if timeout_ms == -2 {
        if ts.is_null() {
            return None;
        }
        // SAFETY: the program passed a valid timespec pointer to ppoll/epoll_pwait2.
        let t = unsafe { *ts };
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    } else if timeout_ms < 0 {
        return None;
    } else {
        Duration::from_millis(timeout_ms as u64)
    };
    // A timeout too large for the clock (some programs pass LONG_MAX for "forever") is
    // no deadline at all.
    Instant::now().checked_add(d)
}

/// The slice to wait now: until the program's deadline or the AEH's next timer.
pub(super) fn slice_ms(deadline: Option<Instant>, wake: Option<Instant>) -> c_int {
    let t = match (deadline, wake) {
        (None, None) => return -1,
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(b)) => a.min(b),
    };
    net::ms_ceil(t.saturating_duration_since(Instant::now()))
}

pub(super) fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

impl GcbLayer {
    /// The layer for the broker at `broker`.
    pub fn new(
        broker: SocketAddrV4,
        key: Option<gcb_proto::PoolKey>,
        heartbeat: Duration,
        standby: bool,
    ) -> GcbLayer {
        GcbLayer {
            client: ForkMutex::new(Client::new(broker, key, heartbeat, standby)),
        }
    }

    /// The broker's IP: where this process's proxies live.
    pub fn broker_ip(&self) -> std::net::Ipv4Addr {
        *self.client.lock().broker.ip()
    }

    /// The client, behind its lock.
    pub fn client(&self) -> &ForkMutex<Client> {
        &self.client
    }

    /// Run the AEH once if this process has something to serve; returns the fds it
    /// waits on and its next timer.
    pub fn pump(&self) -> Option<(Vec<c_int>, Option<Instant>)> {
        let mut c = self.client.lock();
        if !c.needs_aeh() {
            return None;
        }
        c.pump();
        Some((c.aeh_fds(), c.next_wakeup()))
    }

    /// AEH state for a wait: the fds it waits on and its next timer, if it must run.
    pub(super) fn aeh(&self) -> Option<(Vec<c_int>, Option<Instant>)> {
        let c = self.client.lock();
        if !c.needs_aeh() {
            return None;
        }
        Some((c.aeh_fds(), c.next_wakeup()))
    }
}
