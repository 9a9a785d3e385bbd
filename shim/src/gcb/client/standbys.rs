//! The standby connections of this process's registered TCP listeners (see
//! [`crate::gcb::standby`]): one parked connection per listener to the broker's relay,
//! claimed by the broker for a relayed connection and then handed to the program like a
//! dial-back.

use libc::c_int;
use std::net::SocketAddrV4;
use std::time::Instant;

use super::state::Client;
use crate::gcb::standby::{self, Standby, StandbyEvent, StandbySlot, Watch};
use crate::gcb::tcp_punch::{self, ListenerProgress, ListenerPunch};
use crate::net::errstr;

impl Client {
    /// A standby slot for a TCP registration whose token is `token` (its standby key),
    /// with the watch opened; None if the broker gave no key or the watch fails.
    pub(super) fn standby_slot(&mut self, token: Option<&str>) -> Option<StandbySlot> {
        if !self.standby_enabled {
            return None;
        }
        let key = standby::parse_key(token?)?;
        if self.watch.is_none() {
            match Watch::open() {
                Ok(w) => self.watch = Some(w),
                Err(e) => {
                    crate::debug!("no standby watch: {}", errstr(e));
                    return None;
                }
            }
        }
        Some(StandbySlot::new(key))
    }

    pub(super) fn drop_standby(&mut self, conn: Standby) {
        if let Some(w) = &self.watch {
            w.remove(conn.fd());
        }
        conn.close();
    }

    /// Park connected standbys, hand claimed ones to the program, then dial the
    /// missing ones (after the hand-overs: those are on a connection's critical path).
    pub(super) fn service_standbys(&mut self) {
        let mut claimed: Vec<(c_int, SocketAddrV4, SocketAddrV4)> = Vec::new();
        let watch = self.watch.as_ref();
        let key = self.key.as_ref();
        let punching = self.punch_wait.is_some();
        let heartbeat_every = self.heartbeat_every;
        for r in self.regs.values_mut() {
            let Some(slot) = r.standby.as_mut() else {
                continue;
            };
            let Some(conn) = slot.conn.as_mut() else {
                continue;
            };
            let (ev, parked) = conn.poll();
            if parked {
                watch.inspect(|w| w.parked(conn.fd()));
            }
            match ev {
                StandbyEvent::Idle => {}
                StandbyEvent::Dead(why) => {
                    let mut was_parked = false;
                    if let Some(c) = slot.conn.take() {
                        was_parked = c.parked();
                        watch.inspect(|w| w.remove(c.fd()));
                        c.close();
                    }
                    if !why.is_empty() {
                        crate::debug!("standby for {}: {}", r.local, why);
                    }
                    if why.is_empty() && was_parked {
                        // The broker closed it without a claim: it no longer knows our key
                        // (it restarted and we have not registered again yet) or has no
                        // room. Redialing at once would be refused again; the next
                        // heartbeat settles the registration, and a new one brings a new
                        // slot that dials at once.
                        slot.failed_for(Instant::now(), heartbeat_every);
                    } else {
                        slot.failed(Instant::now());
                    }
                }
                StandbyEvent::PunchClaim(raw) => {
                    slot.worked();
                    let Some(c) = slot.conn.take() else { continue };
                    let checked = if !punching {
                        Err("TCP punching is off here (GCB_PUNCH_TCP=0)".into())
                    } else if self.tcp_punches.len() >= tcp_punch::MAX_IN_FLIGHT {
                        // Each holds two fds for up to seconds: a flood of claims must not
                        // take the program's fds. The broker relays instead.
                        Err(format!(
                            "{} punches in flight already",
                            tcp_punch::MAX_IN_FLIGHT
                        ))
                    } else {
                        tcp_punch::check_claim(key, &slot.key, &raw, &mut self.punch_nonces)
                    };
                    match checked {
                        Ok(msg) => {
                            crate::debug!(
                                "standby for {}: punch claim, connecting to {}",
                                r.local,
                                msg.peer
                            );
                            let p = ListenerPunch::start(c, msg, r.family, r.listen_at, watch);
                            self.tcp_punches.push(p);
                        }
                        Err(why) => {
                            crate::warn!("standby for {}: refused a punch claim: {}", r.local, why);
                            watch.inspect(|w| w.remove(c.fd()));
                            c.close();
                        }
                    }
                }
                StandbyEvent::Claimed(fd, peer) => {
                    watch.inspect(|w| w.remove(fd));
                    slot.worked();
                    let Some(c) = slot.conn.take() else { continue };
                    match c.into_connection() {
                        Ok(cfd) => claimed.push((cfd, r.listen_at, peer)),
                        Err(e) => {
                            crate::warn!("standby connection from {} lost: {}", peer, errstr(e))
                        }
                    }
                }
            }
        }
        for (fd, listen_at, peer) in claimed {
            match self.hand_over(fd, listen_at, peer) {
                Ok(key) => crate::debug!("standby claimed for peer {}: placeholder {}", peer, key),
                Err(why) => crate::warn!("standby connection from {} lost: {}", peer, why),
            }
        }
        self.service_tcp_punches();
        if self.direct.is_some() {
            // A blocking accept() returns a connection from this run: dial the next
            // standby on the next run, after the program has its connection.
            return;
        }
        let now = Instant::now();
        let watch = self.watch.as_ref();
        for r in self.regs.values_mut() {
            let Some(slot) = r.standby.as_mut().filter(|s| s.due(now)) else {
                continue;
            };
            // The relay of the broker it is registered with (one of the pool's).
            let relay = r.broker;
            match Standby::dial(relay, slot.key, r.family) {
                Ok(c) => {
                    watch.inspect(|w| w.add_connecting(c.fd()));
                    slot.conn = Some(c);
                }
                Err(e) => {
                    crate::debug!("standby dial to {}: {}", relay, errstr(e));
                    slot.failed(now);
                }
            }
        }
    }
}

impl Client {
    /// Advances our listeners' TCP punches; hands finished ones to the program.
    fn service_tcp_punches(&mut self) {
        if self.tcp_punches.is_empty() {
            return;
        }
        let Some(key) = self.key.clone() else {
            for p in self.tcp_punches.drain(..) {
                p.close();
            }
            return;
        };
        let now = Instant::now();
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.tcp_punches.len() {
            let watch = self.watch.as_ref();
            match self.tcp_punches[i].poll(&key, now, watch) {
                ListenerProgress::Pending => i += 1,
                ListenerProgress::Done(fd, peer, route) => {
                    let p = self.tcp_punches.swap_remove(i);
                    for f in p.fds() {
                        watch.inspect(|w| w.remove(f));
                    }
                    done.push((fd, p.listen_at, peer, route));
                    p.close();
                }
                ListenerProgress::Failed(why) => {
                    let p = self.tcp_punches.swap_remove(i);
                    for f in p.fds() {
                        watch.inspect(|w| w.remove(f));
                    }
                    crate::info!("punched connection for {}: {}", p.listen_at, why);
                    p.close();
                }
            }
        }
        for (fd, listen_at, peer, route) in done {
            match self.hand_over(fd, listen_at, peer) {
                Ok(_) => crate::debug!("accept: connection from {} route {}", peer, route),
                Err(why) => crate::warn!("connection from {} lost: {}", peer, why),
            }
        }
    }

    /// When a TCP punch of ours needs the AEH even without an event.
    pub(super) fn tcp_punch_wakeup(&self) -> Option<Instant> {
        self.tcp_punches.iter().map(|p| p.wakeup()).min()
    }

    /// A fork child: the punches are the parent's.
    pub(super) fn forget_tcp_punches_in_child(&mut self) {
        for p in self.tcp_punches.drain(..) {
            p.forget_in_child();
        }
    }
}
