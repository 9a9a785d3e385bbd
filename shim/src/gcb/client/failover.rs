//! Failover in a broker pool (`GCB_BROKER=IP[:PORT],IP[:PORT],...`).
//!
//! Each TCP listener has an order of the pool's brokers ([`Client::order_for`], the
//! rendezvous ranking of [`gcb_proto::pool`] for its identity: its registered local
//! address and this host's id) and registers with the first. A heartbeat unanswered
//! within [`Client::heartbeat_deadline`] (6/10 of the heartbeat interval, at most 3 s) is
//! followed by one probe on the process's own private channel to that broker (3/10, at
//! most 2 s: a registration channel is shared with forked and exec'd holders of the
//! listener, and a sibling may read our answer off it). Unanswered too, the broker is
//! lost: every TCP listener registered there over that channel is registered with the
//! next broker of its own order at once (the registration-retry machinery, without
//! waiting), so it has a new proxy within two heartbeat intervals of the lost broker's
//! last answer plus one round trip to the next broker (the next heartbeat comes within
//! one interval, and the two deadlines take at most 9/10 of one). Until then, and if no
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
//! Every process that holds the listener and runs the AEH (fork children, pre-fork
//! workers) detects the loss and moves its copy of the registration itself: each then has
//! a proxy of its own on the next broker (served by the same socket). UDP registrations
//! stay with their broker (the pool's first): they are not moved.

use gcb_proto::{pool, Body, Transport};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::state::{Client, Pending, RegKey, RegisterRetry, REGISTER_RETRY_FIRST};
use crate::control;

/// The shortest heartbeat and probe deadline: a few retransmissions on a lossy path.
const DEADLINE_MIN: Duration = Duration::from_millis(250);
const HEARTBEAT_DEADLINE_MAX: Duration = Duration::from_secs(3);
const PROBE_DEADLINE_MAX: Duration = Duration::from_secs(2);

impl Client {
    /// The order in which the listener registered as `local` tries the pool's brokers.
    pub(super) fn order_for(&self, local: SocketAddrV4) -> Vec<SocketAddrV4> {
        let order = pool::rank(&self.pool, pool::identity(local, &self.host_id));
        if order.is_empty() {
            return vec![self.broker];
        }
        order
    }

    /// How long a heartbeat may go unanswered before its broker is probed: 6/10 of the
    /// heartbeat interval (the request is retransmitted meanwhile), within
    /// [`DEADLINE_MIN`] and 3 s. With one broker nothing moves, and the usual request
    /// deadline applies (a lossy path is not called a lost broker sooner than before).
    pub(super) fn heartbeat_deadline(&self) -> Duration {
        if self.pool.len() < 2 {
            return control::REQUEST_DEADLINE;
        }
        (self.heartbeat.interval() * 6 / 10).clamp(DEADLINE_MIN, HEARTBEAT_DEADLINE_MAX)
    }

    /// How long the probe of a broker whose heartbeat went unanswered may take: 3/10 of
    /// the heartbeat interval, within [`DEADLINE_MIN`] and 2 s. With the heartbeat
    /// deadline, under 9/10 of an interval: the failover bound holds.
    fn probe_deadline(&self) -> Duration {
        (self.heartbeat.interval() * 3 / 10).clamp(DEADLINE_MIN, PROBE_DEADLINE_MAX)
    }

    /// A heartbeat on registration channel `chan` went unanswered. With a pool and TCP
    /// listeners there, ask the broker once more on this process's own private channel
    /// before moving them: a registration channel is shared with the processes that
    /// inherited the listener (fork, exec), and a sibling reading the answer to our
    /// heartbeat off the shared socket must not make us leave a live broker.
    pub(super) fn heartbeat_unanswered(&mut self, chan: u64) {
        let Some(broker) = self.chan(chan).map(|c| c.peer) else {
            return;
        };
        let movable = self
            .regs
            .iter()
            .any(|((t, _), r)| *t == Transport::Tcp && r.chan == chan && r.udp.is_none());
        if self.pool.len() < 2 || !movable {
            return self.broker_lost(chan);
        }
        let probing = self.privates.iter().any(|c| {
            c.pending
                .values()
                .any(|p| matches!(p, Pending::Probe { chan: c } if *c == chan))
        });
        if probing {
            return;
        }
        let deadline = self.probe_deadline();
        let sent = self.private_channel(broker).ok().and_then(|id| {
            let c = self.chan(id)?;
            let body = Body::Heartbeat { proxies: vec![] };
            let rid = c
                .ep
                .send_request_with_deadline(control::now(), SocketAddr::V4(broker), body, deadline)
                .ok()?;
            c.pending.insert(rid, Pending::Probe { chan });
            c.flush();
            Some(())
        });
        if sent.is_none() {
            self.broker_lost(chan);
        }
    }

    /// The probe after an unanswered heartbeat was answered: the broker lives (the answer
    /// to the heartbeat went elsewhere or was lost); nothing moves.
    pub(super) fn broker_answered_probe(&mut self, chan: u64) {
        if let Some(c) = self.chan(chan) {
            crate::debug!(
                "broker {} answered a probe after an unanswered heartbeat; staying",
                c.peer
            );
        }
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
