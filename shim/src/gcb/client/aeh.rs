//! The asynchronous event handler ([`Client::pump`]): reads the channels, serves the
//! broker's commands, runs the timers (one [`TimerTable`], see [`Client::timers`]), and
//! tells the interposed waits when it must run next; also what a fork child keeps.

use gcb_proto::{Body, Event, Transport};
use libc::c_int;
use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::state::{Client, Pending, RegKey};
use super::timers::{Timer, TimerTable};
use crate::control::{self, now, Answer};
use crate::gcb::punch;
use crate::net;

/// How often placeholder connections still being established are checked.
const PLACEHOLDER_CHECK: Duration = Duration::from_millis(50);

impl Client {
    /// In a fork child. The child holds the same listening sockets, so it keeps the
    /// registrations, their channels and the mailbox (shared with the parent); requests
    /// in flight belong to the parent's threads, and the private channel to the parent.
    pub fn reset_after_fork(&mut self) {
        for p in self.privates.drain(..) {
            p.close();
        }
        // Standbys belong to the process that registered (see `standby`): close the
        // copies we inherited; the parent keeps using its own.
        for r in self.regs.values_mut() {
            if let Some(conn) = r.standby.take().and_then(|s| s.conn) {
                conn.forget_in_child();
            }
        }
        self.forget_tcp_punches_in_child();
        // Dials in flight and registration retries are the parent's too.
        self.dials.forget_in_child();
        self.retries.clear();
        self.note_retries();
        if let Some(w) = self.watch.take() {
            w.close();
        }
        for f in &mut self.families {
            f.pending.clear();
            f.answers.clear();
            f.ep = control::endpoint(&self.key);
        }
    }

    /// Run the AEH for a blocking accept() on the listener registered as `proxy`:
    /// returns a brokered connection for it, if one came in (see `direct_for`).
    pub fn pump_for_accept(&mut self, proxy: SocketAddrV4) -> Option<(c_int, SocketAddrV4)> {
        self.direct_for = self.regs.get(&(Transport::Tcp, proxy)).map(|r| r.listen_at);
        self.pump();
        self.direct_for = None;
        self.direct.take()
    }

    /// Does the AEH need to run while the program waits? (Registrations to serve, a
    /// UDP registration on its way, dial-backs in flight, listeners to register again.)
    pub fn needs_aeh(&self) -> bool {
        (!self.families.is_empty()
            && (!self.regs.is_empty()
                || self.families.iter().any(|c| {
                    c.pending
                        .values()
                        .any(|p| matches!(p, Pending::RegisterUdp { .. }))
                })))
            || !self.dials.is_empty()
            || !self.retries.is_empty()
    }

    /// What the AEH waits on: the registration channels' fds (at most 8), then the
    /// standby watch (see [`Client::watch_fd`]).
    pub fn aeh_fds(&self) -> Vec<c_int> {
        let mut v: Vec<c_int> = self.families.iter().take(8).map(|c| c.fd.fd()).collect();
        v.extend(self.watch_fd());
        v
    }

    /// The standby watch's fd: added edge-triggered to a program's epoll sets.
    pub fn watch_fd(&self) -> Option<c_int> {
        self.watch.as_ref().map(|w| w.fd())
    }

    /// Every timer of the AEH, each kind at the earliest deadline of its sources.
    pub fn timers(&self) -> TimerTable {
        let mut t = TimerTable::default();
        let chans = self.families.iter().chain(&self.privates);
        t.set_earliest(
            Timer::Request,
            chans.filter_map(|c| c.ep.poll_request_timeout()),
        );
        if !self.regs.is_empty() {
            t.set(
                Timer::Heartbeat,
                self.heartbeat.next_due().unwrap_or_else(Instant::now),
            );
        }
        if !self.placeholders.is_empty() {
            t.set(Timer::Placeholders, Instant::now() + PLACEHOLDER_CHECK);
        }
        let udp = self.regs.values().filter_map(|r| r.udp.as_ref());
        t.set_earliest(Timer::Keepalive, udp.map(|u| u.next_dummy));
        let standbys = self.regs.values().filter_map(|r| r.standby.as_ref());
        t.set_earliest(
            Timer::Standby,
            standbys
                .filter_map(|s| s.wakeup())
                .chain(self.tcp_punch_wakeup()),
        );
        t.set_earliest(Timer::Punch, self.punch_next_due());
        t.set_earliest(Timer::Dial, self.dials.wakeup(self.watch.is_some()));
        let retries = self.retries.iter().filter(|r| !r.asking);
        t.set_earliest(Timer::RegisterRetry, retries.map(|r| r.next));
        t
    }

    /// When the AEH must run next even if nothing arrives.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.timers().next_timeout()
    }

    /// The asynchronous event handler: read the channels, run timers, act on the
    /// broker's commands, send heartbeats when due. Never waits for the network (a
    /// dial-back to the broker's relay port at most `RELAY_DIAL_QUICK`).
    pub fn pump(&mut self) {
        let mut work: Vec<(u64, Event)> = Vec::new();
        for c in self.families.iter_mut().chain(&mut self.privates) {
            let id = c.id;
            let from = SocketAddr::V4(c.peer);
            work.extend(c.poll(from).into_iter().map(|e| (id, e)));
        }
        for (chan, ev) in work {
            self.on_event(chan, ev);
        }
        self.service_dials();
        let t = now();
        if !self.regs.is_empty() && self.heartbeat.poll_spread(t.mono, control::random_u64()) {
            let mut by_chan: HashMap<u64, Vec<SocketAddr>> = HashMap::new();
            for ((_, p), r) in &self.regs {
                let v = by_chan.entry(r.chan).or_default();
                if !v.contains(&SocketAddr::V4(*p)) {
                    v.push(SocketAddr::V4(*p));
                }
            }
            // A heartbeat unanswered within this long has its broker probed, and moved
            // from if the probe goes unanswered too (see `failover`).
            let deadline = self.heartbeat_deadline();
            for (chan, proxies) in by_chan {
                let Some(c) = self.chan(chan) else { continue };
                let from = SocketAddr::V4(c.peer);
                for body in gcb_proto::msg::heartbeat_batches(&proxies) {
                    if let Ok(id) = c.ep.send_request_with_deadline(t, from, body, deadline) {
                        c.pending.insert(id, Pending::Heartbeat);
                    }
                }
            }
        }
        if !self.placeholders.is_empty() {
            self.reap_placeholders();
        }
        self.service_standbys();
        self.register_retries(t.mono);
        self.udp_keepalive(t.mono);
        self.punch_tick(t.mono);
        for c in self.families.iter_mut().chain(&mut self.privates) {
            c.flush();
        }
    }

    fn on_event(&mut self, chan: u64, ev: Event) {
        match ev {
            Event::Request { from, id, body } => {
                let reply = match body {
                    Body::ConnectBack {
                        connect_id,
                        dial,
                        proxy,
                        logical_peer,
                    } => self.on_connect_back(connect_id, dial, proxy, logical_peer),
                    Body::PunchBack {
                        proxy,
                        peer,
                        peer_local,
                        nonce,
                    } => self.on_punch_back(proxy, peer, peer_local, &nonce),
                    Body::PunchEnd {
                        proxy,
                        peer,
                        peer_proxy,
                    } => self.on_punch_end(proxy, &[peer, peer_proxy]),
                    Body::ReregisterRequest {} => {
                        crate::info!("broker {} asks us to register again", from);
                        let mine: Vec<RegKey> = self
                            .regs
                            .iter()
                            .filter(|(_, r)| r.chan == chan)
                            .map(|(k, _)| *k)
                            .collect();
                        for k in mine {
                            self.reregister(k);
                        }
                        Body::Ack {}
                    }
                    other => Body::error(
                        gcb_proto::ErrorCode::Unsupported,
                        format!("a client does not serve {}", other.type_name()),
                    ),
                };
                if let Some(c) = self.chan(chan) {
                    let _ = c.ep.respond(now(), from, id, reply);
                }
            }
            Event::Response { request, body, .. } => {
                let Some(c) = self.chan(chan) else { return };
                match c.pending.remove(&request) {
                    Some(Pending::Waiter) => {
                        c.answers.insert(request, Answer::Body(body));
                    }
                    Some(Pending::Heartbeat) => {
                        if let Body::HeartbeatAck { unknown } = body {
                            for p in unknown.into_iter().filter_map(net::v4) {
                                for t in [Transport::Tcp, Transport::Udp] {
                                    self.reregister((t, p));
                                }
                            }
                        }
                    }
                    Some(Pending::Reregister { old }) => self.on_reregistered(old, body),
                    Some(Pending::Punch { entry, dest }) => {
                        if let Some(e) = entry.upgrade() {
                            punch::on_answer(&e, dest, Some(body));
                        }
                    }
                    Some(Pending::RegisterUdp {
                        entry,
                        local,
                        fd,
                        dest,
                    }) => self.finish_udp_registration(chan, entry, local, fd, dest, Some(body)),
                    Some(Pending::RegisterRetry { id }) => {
                        self.finish_register_retry(chan, id, Some(body))
                    }
                    Some(Pending::Probe { chan }) => self.broker_answered_probe(chan),
                    Some(Pending::Unregister) | None => {}
                }
            }
            Event::Timeout { request, .. } => {
                let Some(c) = self.chan(chan) else { return };
                match c.pending.remove(&request) {
                    Some(Pending::Waiter) => {
                        c.answers.insert(request, Answer::Timeout);
                    }
                    Some(Pending::Heartbeat) => self.heartbeat_unanswered(chan),
                    Some(Pending::Probe { chan }) => self.broker_lost(chan),
                    Some(Pending::Reregister { old }) => {
                        crate::warn!("re-registration of {} unanswered; will retry", old.1)
                    }
                    Some(Pending::Punch { entry, dest }) => {
                        if let Some(e) = entry.upgrade() {
                            punch::on_answer(&e, dest, None);
                        }
                    }
                    Some(Pending::RegisterUdp {
                        entry,
                        local,
                        fd,
                        dest,
                    }) => self.finish_udp_registration(chan, entry, local, fd, dest, None),
                    Some(Pending::RegisterRetry { id }) => {
                        self.finish_register_retry(chan, id, None)
                    }
                    _ => {}
                }
            }
        }
    }
}
