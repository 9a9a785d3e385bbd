//! Registering bound UDP sockets with the broker: at once (waiting), or started by the
//! socket's first datagram to the broker and finished by the AEH; sockets of ours on the
//! same address (SO_REUSEADDR) share one registration; and the keepalives that keep the
//! socket's NAT mapping toward its proxy open.

use gcb_proto::{Body, Transport};
use libc::c_int;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::register::REGISTER_DEADLINE;
use super::state::{Client, Pending, Registration, UdpReg, DUMMY_REPEATS, DUMMY_RETRY};
use crate::control::now;
use crate::fdtable::{self, FdEntry};
use crate::gcb::punch;
use crate::net::{self, errstr};
use crate::procid::inode;
use crate::sockstate::{SockState, UdpSock};

impl Client {
    /// Register a bound UDP socket; returns its proxy and token.
    pub fn register_udp(
        &mut self,
        local: SocketAddrV4,
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) -> Result<(SocketAddrV4, Vec<u8>), String> {
        if let Some(shared) = self.share_udp(local, entry) {
            return Ok(shared);
        }
        let (chan, proxy, token) = self.register_request(self.broker, Transport::Udp, local)?;
        let token = self
            .take_token(Transport::Udp, proxy, token.as_deref())
            .ok_or("broker gave no valid token for a udp registration")?
            .into_bytes();
        self.insert_udp_registration(chan, local, proxy, &token, entry, fd);
        Ok((proxy, token))
    }

    /// Another socket of ours on the same address (SO_REUSEADDR) shares its registration:
    /// `entry` becomes one of its holders. Its proxy and token, if there is one.
    fn share_udp(
        &mut self,
        local: SocketAddrV4,
        entry: &Arc<FdEntry>,
    ) -> Option<(SocketAddrV4, Vec<u8>)> {
        let ((_, proxy), u) = self
            .regs
            .iter_mut()
            .filter(|(_, r)| r.local == local)
            .find_map(|(k, r)| r.udp.as_mut().map(|u| (k, u)))?;
        u.holders.retain(|h| h.strong_count() > 0);
        u.holders.push(Arc::downgrade(entry));
        Some((*proxy, u.token.clone()))
    }

    fn insert_udp_registration(
        &mut self,
        chan: u64,
        local: SocketAddrV4,
        proxy: SocketAddrV4,
        token: &[u8],
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) {
        self.regs.insert(
            (Transport::Udp, proxy),
            Registration {
                local,
                listen_at: local,
                inode: inode(fd).unwrap_or(0),
                chan,
                broker: self.broker,
                entry: Arc::downgrade(entry),
                family: entry.domain(),
                udp: Some(UdpReg {
                    holders: vec![Arc::downgrade(entry)],
                    token: token.to_vec(),
                    quick_left: DUMMY_REPEATS,
                    next_dummy: Instant::now() + DUMMY_RETRY,
                }),
                standby: None,
            },
        );
    }

    /// Starts registering the UDP socket `entry` (fd `fd`, bound to `local`) without
    /// waiting for the answer, which the AEH handles (`finish_udp_registration`,
    /// then a punch toward `dest`). `Ok(Some(..))`: another socket of ours on the same
    /// address already holds a registration, shared at once.
    pub fn register_udp_start(
        &mut self,
        local: SocketAddrV4,
        entry: &Arc<FdEntry>,
        fd: c_int,
        dest: SocketAddrV4,
    ) -> Result<Option<(SocketAddrV4, Vec<u8>)>, String> {
        if let Some(shared) = self.share_udp(local, entry) {
            return Ok(Some(shared));
        }
        let chan = self
            .own_family()
            .map_err(|e| format!("no control socket to broker {}: {}", self.broker, errstr(e)))?;
        let previous_proxy = self.previous_for(Transport::Udp, local, self.broker);
        let body = Body::Register {
            transport: Transport::Udp,
            local: SocketAddr::V4(local),
            previous_proxy,
            previous_token: previous_proxy.and_then(|p| self.proof_for(Transport::Udp, p)),
            punch: false,
        };
        let to = SocketAddr::V4(self.broker);
        let c = self.chan(chan).ok_or("no control channel")?;
        let id =
            c.ep.send_request_with_deadline(now(), to, body, REGISTER_DEADLINE)
                .map_err(|_| "control channel full".to_owned())?;
        c.pending.insert(
            id,
            Pending::RegisterUdp {
                entry: Arc::downgrade(entry),
                local,
                fd,
                dest,
            },
        );
        c.flush();
        Ok(None)
    }

    /// The broker's answer (None: none in time) to a [`Self::register_udp_start`]: the
    /// socket becomes a registered one (keepalive, then the punch it was started for),
    /// or, refused, a plain socket again with one log line. A registration whose socket
    /// was closed meanwhile is given back at once.
    pub(super) fn finish_udp_registration(
        &mut self,
        chan: u64,
        entry: Weak<FdEntry>,
        local: SocketAddrV4,
        fd: c_int,
        dest: SocketAddrV4,
        body: Option<Body>,
    ) {
        let granted = match body {
            Some(Body::Registered {
                proxy,
                lease_ms,
                token,
            }) => net::v4(proxy).and_then(|p| {
                let dummy = self.take_token(Transport::Udp, p, token.as_deref())?;
                Some((p, lease_ms, dummy.into_bytes()))
            }),
            _ => None,
        };
        let live = entry
            .upgrade()
            .filter(|e| e.with_state(SockState::take_udp_registering) == Some(true));
        let Some((proxy, lease_ms, token)) = granted else {
            if live.is_some() {
                crate::notice!(
                    Warn,
                    BrokerUnreachable,
                    "bind udp {}: broker {} did not register it; serving locally only (plain socket) (pid {})",
                    local,
                    self.broker,
                    crate::control::getpid()
                );
            }
            self.leave_epolls_if_idle();
            return;
        };
        self.fit_heartbeat(lease_ms);
        let Some(e) = live else {
            // Closed (or taken over) meanwhile: give the proxy back.
            crate::debug!(
                "udp {}: closed before its registration came; unregistering",
                local
            );
            self.send_unregister(chan, Transport::Udp, proxy);
            self.leave_epolls_if_idle();
            return;
        };
        self.insert_udp_registration(chan, local, proxy, &token, &e, fd);
        e.with_state(|s| {
            *s = SockState::UdpRegistered(UdpSock::new(proxy, *self.broker.ip()));
        });
        let fd = fdtable::fds_of(&e).first().copied().unwrap_or(fd);
        punch::send_keepalive(fd, proxy, &token);
        crate::info!(
            "registered udp {} with broker {}: proxy {}",
            local,
            self.broker,
            proxy
        );
        let ask = punch::with_sock(&e, |u| {
            dest != u.proxy && u.punch.should_ask(dest, Instant::now())
        });
        if ask == Some(true) {
            self.request_punch(proxy, dest, &e);
        }
    }

    /// Count a stray datagram dropped on a GCB UDP socket; returns the total.
    pub fn count_udp_stray(&mut self) -> u64 {
        self.udp_stray += 1;
        self.udp_stray
    }

    /// Keepalives from the program's UDP sockets (they keep the NAT mapping toward the
    /// proxy open and tell the broker where the socket is): a few quick repeats after
    /// registering, then one per heartbeat interval. They ask for no ack, so nothing of
    /// the shim's lands in the program's socket.
    pub(super) fn udp_keepalive(&mut self, now: Instant) {
        let every = self.heartbeat.interval();
        for ((_, proxy), r) in self.regs.iter_mut() {
            let Some(u) = r.udp.as_mut() else { continue };
            if now < u.next_dummy {
                continue;
            }
            let Some(fd) = u
                .holders
                .iter()
                .filter_map(|h| h.upgrade())
                .find_map(|e| fdtable::fds_of(&e).first().copied())
            else {
                continue;
            };
            punch::send_keepalive(fd, *proxy, &u.token);
            if u.quick_left > 0 {
                u.quick_left -= 1;
                u.next_dummy = now + DUMMY_RETRY * 2;
            } else {
                u.next_dummy = now + every;
            }
        }
    }
}
