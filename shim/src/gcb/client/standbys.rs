//! The standby connections of this process's registered TCP listeners (see
//! [`crate::gcb::standby`]): one parked connection per listener to the broker's relay,
//! claimed by the broker for a relayed connection and then handed to the program like a
//! dial-back.

use libc::c_int;
use std::net::SocketAddrV4;
use std::time::Instant;

use super::state::Client;
use crate::gcb::standby::{self, Standby, StandbyEvent, StandbySlot, Watch};
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
                    if let Some(c) = slot.conn.take() {
                        watch.inspect(|w| w.remove(c.fd()));
                        c.close();
                    }
                    if !why.is_empty() {
                        crate::debug!("standby for {}: {}", r.local, why);
                    }
                    slot.failed(Instant::now());
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
