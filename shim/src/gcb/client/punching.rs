//! The client's part in UDP hole punching (see [`crate::gcb::punch`], which keeps the
//! per-socket records): asking the broker to punch toward an address on it, the AEH's
//! punch timers, and the broker's `punch_back` and `punch_end`.

use gcb_proto::{Body, Transport};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use super::state::{Client, Pending};
use crate::control::now;
use crate::fdtable::FdEntry;
use crate::gcb::punch;
use crate::net;

impl Client {
    /// UDP hole punching (see [`crate::gcb::punch`]): the socket `entry`, registered as
    /// `my_proxy`, sends to `dest`, an address on the broker. Asks the broker on the
    /// registration's channel without waiting; the answer arrives in the AEH.
    pub fn request_punch(
        &mut self,
        my_proxy: SocketAddrV4,
        dest: SocketAddrV4,
        entry: &Arc<FdEntry>,
    ) {
        let Some((chan, token, broker)) = self
            .regs
            .get(&(Transport::Udp, my_proxy))
            .and_then(|r| Some((r.chan, r.udp.as_ref()?.token.clone(), r.broker)))
        else {
            return;
        };
        let to = SocketAddr::V4(broker);
        let Some(c) = self.chan(chan) else { return };
        let body = Body::PunchRequest {
            proxy: SocketAddr::V4(dest),
            from_proxy: SocketAddr::V4(my_proxy),
            token: String::from_utf8_lossy(&token).into_owned(),
        };
        match c.ep.send_request(now(), to, body) {
            Ok(id) => {
                c.pending.insert(
                    id,
                    Pending::Punch {
                        entry: Arc::downgrade(entry),
                        dest,
                    },
                );
                c.flush();
                crate::debug!("punch: asked broker about {} (from {})", dest, my_proxy);
            }
            Err(_) => crate::debug!("punch: cannot ask about {}", dest),
        }
    }

    /// The first live socket of each UDP registration (the one that sends keepalives).
    fn punch_entries(&self) -> impl Iterator<Item = Arc<FdEntry>> + '_ {
        self.regs
            .values()
            .filter_map(|r| r.udp.as_ref())
            .filter_map(|u| u.holders.iter().find_map(|h| h.upgrade()))
    }

    pub(super) fn punch_tick(&mut self, now: Instant) {
        for e in self.punch_entries() {
            punch::tick(&e, now);
        }
    }

    pub(super) fn punch_next_due(&self) -> Option<Instant> {
        self.punch_entries()
            .filter_map(|e| punch::next_due(&e))
            .min()
    }

    /// The live sockets of our UDP registration `proxy` (the first one sends keepalives
    /// and punches), or the error to answer the broker with.
    fn udp_holders(&self, proxy: SocketAddr) -> Result<Vec<Arc<FdEntry>>, Body> {
        let Some(proxy) = net::v4(proxy) else {
            return Err(Body::error(gcb_proto::ErrorCode::BadRequest, "IPv4 only"));
        };
        let live: Vec<Arc<FdEntry>> = self
            .regs
            .get(&(Transport::Udp, proxy))
            .and_then(|r| r.udp.as_ref())
            .map(|u| u.holders.iter().filter_map(|h| h.upgrade()).collect())
            .unwrap_or_default();
        if live.is_empty() {
            return Err(Body::error(
                gcb_proto::ErrorCode::NoSuchRegistration,
                format!("{proxy} is not registered here"),
            ));
        }
        Ok(live)
    }

    /// The broker's `punch_back` for our UDP registration `proxy`.
    pub(super) fn on_punch_back(
        &mut self,
        proxy: SocketAddr,
        peer: SocketAddrV4,
        peer_local: Option<SocketAddrV4>,
        nonce: &str,
    ) -> Body {
        match self.udp_holders(proxy) {
            Ok(live) => punch::on_punch_back(&live[0], peer, peer_local, nonce),
            Err(answer) => answer,
        }
    }

    /// The broker's `punch_end` for our UDP registration `proxy`: a registration we
    /// punched with is gone, named by the addresses our records may be keyed by.
    pub(super) fn on_punch_end(&mut self, proxy: SocketAddr, gone: &[SocketAddrV4]) -> Body {
        match self.udp_holders(proxy) {
            Ok(live) => {
                for e in &live {
                    punch::on_punch_end(e, gone);
                }
                Body::Ack {}
            }
            Err(answer) => answer,
        }
    }
}
