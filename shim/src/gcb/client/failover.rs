//! Failover in a broker pool (`GCB_BROKER=IP[:PORT],IP[:PORT],...`).
//!
//! Each TCP listener has an order of the pool's brokers ([`Client::order_for`], the
//! rendezvous ranking of [`gcb_proto::pool`] for its identity: its registered local
//! address and this host's id) and registers with the first. A heartbeat unanswered
//! within [`Client::heartbeat_deadline`] (at most one heartbeat interval) means its
//! broker is lost: every TCP listener registered there over that channel is registered
//! with the next broker of its own order at once (the registration-retry machinery,
//! without waiting), so it has a new proxy within two heartbeat intervals of the lost
//! broker's last answer plus one round trip to the next broker. Until then, and if no
//! broker answers, it serves local connections, as with one broker. Connections already
//! open are the program's own sockets (direct ones, and relays through other brokers)
//! and stay up; relayed ones through the lost broker die with it. From the new
//! registration on, `getsockname()` reports the new proxy and the standby connection
//! parks at the new broker's relay.
//!
//! No flapping: a listener stays with the broker it moved to until that one fails in
//! turn (then it tries the next after it, wrapping around to its first), even when its
//! first broker is back. Moving back would change its address a second time for nothing:
//! every peer that learned the new address would lose it, and a broker that restarts
//! within a heartbeat interval keeps its registrations anyway (it asks for them again,
//! with the same proxies).
//!
//! UDP registrations stay with their broker (the pool's first): they are not moved.

use gcb_proto::{pool, Transport};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use super::state::{Client, RegKey, RegisterRetry, REGISTER_RETRY_FIRST};
use crate::control::{self, REQUEST_DEADLINE};

/// The shortest heartbeat deadline: enough for a few retransmissions on a lossy path.
const HEARTBEAT_DEADLINE_MIN: Duration = Duration::from_millis(300);

impl Client {
    /// The order in which the listener registered as `local` tries the pool's brokers.
    pub(super) fn order_for(&self, local: SocketAddrV4) -> Vec<SocketAddrV4> {
        let order = pool::rank(&self.pool, pool::identity(local, &self.host_id));
        if order.is_empty() {
            return vec![self.broker];
        }
        order
    }

    /// How long a heartbeat may go unanswered before its broker counts as lost: 9/10 of
    /// the heartbeat interval (the request is retransmitted meanwhile), within
    /// [`HEARTBEAT_DEADLINE_MIN`] and the usual request deadline.
    pub(super) fn heartbeat_deadline(&self) -> Duration {
        (self.heartbeat.interval() * 9 / 10).clamp(HEARTBEAT_DEADLINE_MIN, REQUEST_DEADLINE)
    }

    /// A heartbeat on channel `chan` went unanswered: its broker is lost. TCP listeners
    /// registered over it move to the next broker of their order (see the module docs);
    /// with a pool of one, they wait for it to answer again, as before.
    pub(super) fn broker_lost(&mut self, chan: u64) {
        let Some(lost) = self.chan(chan).map(|c| c.peer) else {
            return;
        };
        let moving: Vec<RegKey> = self
            .regs
            .iter()
            .filter(|((t, _), r)| *t == Transport::Tcp && r.chan == chan && r.udp.is_none())
            .map(|(k, _)| *k)
            .collect();
        if self.pool.len() < 2 || moving.is_empty() {
            crate::notice!(
                Warn,
                BrokerLost,
                "broker {} stopped answering heartbeats: registered listeners serve local connections only until it answers again (pid {})",
                lost,
                control::getpid()
            );
            return;
        }
        crate::notice!(
            Warn,
            BrokerLost,
            "broker {} stopped answering heartbeats: its {} listener(s) register with the next broker of the pool (new proxy addresses) (pid {})",
            lost,
            moving.len(),
            control::getpid()
        );
        let now = Instant::now();
        for key in moving {
            let Some(mut reg) = self.regs.remove(&key) else {
                continue;
            };
            if let Some(conn) = reg.standby.take().and_then(|s| s.conn) {
                self.drop_standby(conn);
            }
            // Best effort: a broker that is only slow (or back) frees the old proxy now
            // instead of at the end of its lease.
            self.send_unregister(chan, Transport::Tcp, key.1);
            if reg.entry.strong_count() == 0 {
                continue;
            }
            let order = self.order_for(reg.local);
            let next = pool::next_after(&order, lost).unwrap_or(order[0]);
            crate::warn!(
                "listener {} (proxy {}): broker {} lost; registering with {}",
                reg.local,
                key.1,
                lost,
                next
            );
            // Not limited like listen()'s retries: these were registered, so they are
            // bounded by the registrations the broker granted.
            self.retries.push(RegisterRetry {
                id: control::random_u64(),
                broker: next,
                local: reg.local,
                listen_at: reg.listen_at,
                entry: reg.entry,
                next: now,
                backoff: REGISTER_RETRY_FIRST,
                asking: false,
            });
        }
        self.note_retries();
        // Ask now, not at the AEH's next run.
        self.register_retries(now);
    }
}
