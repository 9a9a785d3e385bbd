//! The AEH's timers in one table, in the spirit of quinn-proto's `TimerTable`: one
//! deadline per [`Timer`] kind, so the AEH's next wake-up is the minimum over one array
//! (see `Client::timers` in [`super::aeh`]) and adding a timer is one enum variant and
//! one line where the table is filled.

use std::time::Instant;

/// A kind of timer the AEH runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// A request in flight on a control channel is due for a retransmission or its
    /// deadline.
    Request,
    /// The registrations' heartbeat.
    Heartbeat,
    /// Placeholder connections still being established are checked.
    Placeholders,
    /// A UDP registration's next keepalive.
    Keepalive,
    /// A standby connection to dial or to check.
    Standby,
    /// A hole-punching record's next probe.
    Punch,
    /// A dial-back's next attempt or deadline.
    Dial,
    /// A listener's registration retry.
    RegisterRetry,
}

impl Timer {
    /// Every kind, in table order.
    pub const ALL: [Timer; 8] = [
        Timer::Request,
        Timer::Heartbeat,
        Timer::Placeholders,
        Timer::Keepalive,
        Timer::Standby,
        Timer::Punch,
        Timer::Dial,
        Timer::RegisterRetry,
    ];
}

/// One optional deadline per [`Timer`] kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerTable {
    data: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arm `timer` for `at` (replacing its deadline).
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.data[timer as usize] = Some(at);
    }

    /// Arm `timer` for the earliest of its deadline and `at` (several sources feed one
    /// kind: every channel's requests, every registration's keepalive, ...). An empty
    /// `at` leaves it as it is.
    pub fn set_earliest(&mut self, timer: Timer, at: impl IntoIterator<Item = Instant>) {
        let slot = &mut self.data[timer as usize];
        for x in at {
            *slot = Some(slot.map_or(x, |y| y.min(x)));
        }
    }

    /// Disarm `timer`.
    pub fn stop(&mut self, timer: Timer) {
        self.data[timer as usize] = None;
    }

    /// `timer`'s deadline, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// The earliest deadline of all.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// The timers due at `now`.
    pub fn expired(&self, now: Instant) -> impl Iterator<Item = Timer> + '_ {
        Timer::ALL
            .into_iter()
            .filter(move |&t| self.get(t).is_some_and(|at| at <= now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn empty_table_has_no_timeout() {
        let t = TimerTable::default();
        assert_eq!(t.next_timeout(), None);
        assert_eq!(t.expired(Instant::now()).count(), 0);
    }

    #[test]
    fn next_timeout_is_the_minimum_over_kinds() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::Heartbeat, now + Duration::from_secs(5));
        t.set(Timer::Dial, now + Duration::from_secs(2));
        t.set(Timer::Punch, now + Duration::from_secs(9));
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(2)));
        t.stop(Timer::Dial);
        assert_eq!(t.next_timeout(), Some(now + Duration::from_secs(5)));
        assert_eq!(t.get(Timer::Dial), None);
    }

    #[test]
    fn set_earliest_keeps_the_earliest_source() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        t.set_earliest(Timer::Request, None);
        assert_eq!(t.get(Timer::Request), None);
        t.set_earliest(
            Timer::Request,
            [now + Duration::from_secs(3), now + Duration::from_secs(1)],
        );
        t.set_earliest(Timer::Request, Some(now + Duration::from_secs(2)));
        assert_eq!(t.get(Timer::Request), Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn expired_lists_the_due_kinds_only() {
        let now = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::Keepalive, now);
        t.set(Timer::Standby, now + Duration::from_secs(1));
        t.set(Timer::RegisterRetry, now);
        let due: Vec<Timer> = t.expired(now).collect();
        assert_eq!(due, vec![Timer::Keepalive, Timer::RegisterRetry]);
    }
}
