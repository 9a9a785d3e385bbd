//! Registering listening sockets with the broker (TCP; the UDP side is in
//! [`super::udp_register`]): at listen(), waiting for the answer; later, for a listener
//! the broker did not register then, by retries the AEH does not wait for; and for both
//! transports, the proxy asked for again (`previous_proxy`), release at the last close,
//! and re-registration when the broker forgot us.

use gcb_proto::{Body, Transport};
use libc::c_int;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{
    Client, Pending, RegKey, RegisterRetry, Registration, DUMMY_REPEATS, REGISTER_RETRY_FIRST,
};
use crate::control::{getpid, now, Answer};
use crate::fdtable::{self, FdEntry};
use crate::net::{self, errstr};
use crate::procid::{held_elsewhere, inode};
use crate::sockstate::GcbSock;

/// How long listen() waits for the broker before serving locally only.
pub const REGISTER_DEADLINE: Duration = Duration::from_secs(3);
/// Listeners waiting for a registration retry at most (more are served locally only).
const MAX_REGISTER_RETRIES: usize = 256;
/// How long a closed listener's proxy is asked for again.
const RECENT_TTL: Duration = Duration::from_secs(600);
/// How many listeners of this process wait for a registration retry: lets accept() and
/// listen() on ordinary sockets skip the client lock (see [`awaiting_registration`]).
static RETRIES_PENDING: AtomicUsize = AtomicUsize::new(0);

/// May some listener of this process be waiting for a registration retry? (No lock: false
/// means certainly not.)
pub fn awaiting_registration() -> bool {
    RETRIES_PENDING.load(Ordering::Relaxed) > 0
}

/// Update the proxy a listening socket reports.
pub fn set_listener_proxy(entry: &Arc<FdEntry>, proxy: SocketAddrV4) {
    entry.with_state(|s| s.set_proxy(proxy));
}

impl Client {
    /// Ask `broker` to register `local` for `transport` on this process's own
    /// registration channel to it; returns the channel, the proxy, the lease and the
    /// token.
    pub(super) fn register_request(
        &mut self,
        broker: SocketAddrV4,
        transport: Transport,
        local: SocketAddrV4,
    ) -> Result<(u64, SocketAddrV4, Option<String>), String> {
        let chan = self
            .own_family_to(broker)
            .map_err(|e| format!("no control socket to broker {}: {}", broker, errstr(e)))?;
        let previous_proxy = self.previous_for(transport, local, broker);
        let body = Body::Register {
            transport,
            local: SocketAddr::V4(local),
            previous_proxy,
            previous_token: previous_proxy.and_then(|p| self.proof_for(transport, p)),
            punch: transport == Transport::Tcp && self.punch_wait().is_some(),
        };
        match self.request_on(chan, body, REGISTER_DEADLINE) {
            Err(e) => Err(format!("cannot reach broker {}: {}", broker, errstr(e))),
            Ok(Answer::Timeout) => Err(format!(
                "broker {} did not answer within {:?}",
                broker, REGISTER_DEADLINE
            )),
            Ok(Answer::Body(Body::Registered {
                proxy,
                lease_ms,
                token,
            })) => {
                let proxy = net::v4(proxy).ok_or("broker gave an IPv6 proxy")?;
                self.fit_heartbeat(lease_ms);
                self.heartbeat.reset(Instant::now());
                Ok((chan, proxy, token))
            }
            Ok(Answer::Body(Body::Error { code, reason })) => {
                Err(format!("broker refused: {code:?}: {reason}"))
            }
            Ok(Answer::Body(other)) => Err(format!(
                "unexpected answer {} to register",
                other.type_name()
            )),
        }
    }

    /// Register a listening socket with the first broker of its order in the pool
    /// ([`Self::order_for`]); returns its proxy address.
    pub fn register(
        &mut self,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) -> Result<SocketAddrV4, String> {
        let broker = self.order_for(local)[0];
        let (chan, proxy, token) = self.register_request(broker, Transport::Tcp, local)?;
        let standby_key = self.take_token(Transport::Tcp, proxy, token.as_deref());
        self.insert_tcp_registration(
            chan,
            local,
            listen_at,
            proxy,
            standby_key.as_deref(),
            entry,
            fd,
        );
        Ok(proxy)
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_tcp_registration(
        &mut self,
        chan: u64,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        proxy: SocketAddrV4,
        token: Option<&str>,
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) {
        let standby = self.standby_slot(token);
        let fallback = self.broker;
        let broker = self.chan(chan).map_or(fallback, |c| c.peer);
        self.regs.insert(
            (Transport::Tcp, proxy),
            Registration {
                local,
                listen_at,
                inode: inode(fd).unwrap_or(0),
                chan,
                broker,
                entry: Arc::downgrade(entry),
                family: entry.domain(),
                udp: None,
                standby,
            },
        );
    }

    /// listen() could not register `entry` (local address `local`, reached at
    /// `listen_at`): it serves as a plain socket, and the AEH registers it later (see
    /// `RegisterRetry`), first with the next broker of its order.
    pub fn register_later(
        &mut self,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        entry: &Arc<FdEntry>,
    ) {
        let order = self.order_for(local);
        let broker = gcb_proto::pool::next_after(&order, order[0]).unwrap_or(order[0]);
        self.retries.retain(|r| r.entry.strong_count() > 0);
        if self.retries.len() >= MAX_REGISTER_RETRIES {
            crate::debug!(
                "listen on {}: too many listeners to retry; not retried",
                local
            );
            return;
        }
        self.retries.push(RegisterRetry {
            id: crate::control::random_u64(),
            broker,
            local,
            listen_at,
            entry: Arc::downgrade(entry),
            next: Instant::now() + REGISTER_RETRY_FIRST,
            backoff: REGISTER_RETRY_FIRST,
            asking: false,
        });
        self.note_retries();
    }

    pub(super) fn note_retries(&self) {
        RETRIES_PENDING.store(self.retries.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Is `entry` a listener waiting for a registration retry?
    pub fn awaits_registration(&self, entry: &Arc<FdEntry>) -> bool {
        self.retries
            .iter()
            .any(|r| std::ptr::eq(r.entry.as_ptr(), Arc::as_ptr(entry)))
    }

    /// Ask the broker again for the listeners whose retry is due (without waiting: the
    /// answer comes to [`Self::finish_register_retry`]). Closed listeners are forgotten.
    pub(super) fn register_retries(&mut self, at: Instant) {
        if self.retries.is_empty() {
            return;
        }
        // A closed listener's table entry is gone (we hold it weakly).
        self.retries.retain(|r| r.entry.strong_count() > 0);
        self.note_retries();
        let due: Vec<(u64, SocketAddrV4, SocketAddrV4)> = self
            .retries
            .iter()
            .filter(|r| !r.asking && r.next <= at)
            .map(|r| (r.id, r.local, r.broker))
            .collect();
        if due.is_empty() {
            self.leave_epolls_if_idle();
            return;
        }
        let punch_on = self.punch_wait().is_some();
        for (id, local, broker) in due {
            let chan = self.own_family_to(broker);
            let to = SocketAddr::V4(broker);
            let previous_proxy = self.previous_for(Transport::Tcp, local, broker);
            let previous_token = previous_proxy.and_then(|p| self.proof_for(Transport::Tcp, p));
            let sent = chan.ok().and_then(|chan| {
                let c = self.chan(chan)?;
                let body = Body::Register {
                    transport: Transport::Tcp,
                    local: SocketAddr::V4(local),
                    previous_proxy,
                    previous_token,
                    punch: punch_on,
                };
                let rid =
                    c.ep.send_request_with_deadline(now(), to, body, REGISTER_DEADLINE)
                        .ok()?;
                c.pending.insert(rid, Pending::RegisterRetry { id });
                c.flush();
                Some(())
            });
            let order = self.order_for(local);
            if let Some(r) = self.retries.iter_mut().find(|r| r.id == id) {
                match sent {
                    Some(()) => r.asking = true,
                    None => r.failed(at, &order),
                }
            }
            crate::debug!("listen on {}: asking broker {}", local, broker);
        }
    }

    /// The broker's answer (None: none in time) to a registration retry: the listener
    /// gets its proxy (getsockname() reports it from now on), or waits longer.
    pub(super) fn finish_register_retry(&mut self, chan: u64, id: u64, body: Option<Body>) {
        let Some(i) = self.retries.iter().position(|r| r.id == id) else {
            return;
        };
        let order = self.order_for(self.retries[i].local);
        let granted = match body {
            Some(Body::Registered {
                proxy,
                lease_ms,
                token,
            }) => net::v4(proxy).map(|p| (p, lease_ms, token)),
            other => {
                let r = &mut self.retries[i];
                let asked = r.broker;
                r.failed(Instant::now(), &order);
                crate::debug!(
                    "listen on {}: broker {} did not register it ({}); next try with {} in {:?}",
                    r.local,
                    asked,
                    other.map_or("no answer".to_owned(), |b| format!("{b:?}")),
                    r.broker,
                    r.next.saturating_duration_since(Instant::now())
                );
                return;
            }
        };
        let Some((proxy, lease_ms, token)) = granted else {
            self.retries[i].failed(Instant::now(), &order);
            return;
        };
        let r = self.retries.remove(i);
        self.note_retries();
        self.fit_heartbeat(lease_ms);
        let token = self.take_token(Transport::Tcp, proxy, token.as_deref());
        let live = r.entry.upgrade().and_then(|e| {
            let fd = *fdtable::fds_of(&e).first()?;
            Some((e, fd))
        });
        let Some((entry, fd)) = live else {
            // Closed meanwhile: give the proxy back.
            self.send_unregister(chan, Transport::Tcp, proxy);
            self.leave_epolls_if_idle();
            return;
        };
        if self.regs.is_empty() {
            self.heartbeat.reset(Instant::now());
        }
        self.insert_tcp_registration(
            chan,
            r.local,
            r.listen_at,
            proxy,
            token.as_deref(),
            &entry,
            fd,
        );
        entry.set_gcb(GcbSock::Listener {
            proxy,
            local: r.local,
        });
        crate::info!(
            "registered {} with broker {}: proxy {}",
            r.local,
            r.broker,
            proxy
        );
    }

    /// The proxy to ask `broker` for when registering `local` for `transport`: the one
    /// it had before (a re-created socket keeps its advertised address), else the number
    /// the other transport has on the same local address (one port for TCP and UDP);
    /// never one on another broker's IP.
    pub(super) fn previous_for(
        &mut self,
        transport: Transport,
        local: SocketAddrV4,
        broker: SocketAddrV4,
    ) -> Option<SocketAddr> {
        let recent = self
            .recent
            .remove(&(transport, local))
            .filter(|(_, at)| at.elapsed() < RECENT_TTL)
            .map(|(p, _)| p);
        let sibling = || {
            self.regs
                .iter()
                .find(|((t, _), r)| *t != transport && r.local == local)
                .map(|((_, p), _)| *p)
        };
        recent
            .or_else(sibling)
            .filter(|p| p.ip() == broker.ip())
            .map(SocketAddr::V4)
    }

    /// This process closed its last fd of the listening socket registered as `proxy`.
    /// The registration ends when no other process holds the socket either.
    pub fn release(&mut self, transport: Transport, proxy: SocketAddrV4, entry: &Arc<FdEntry>) {
        if let Some(u) = self
            .regs
            .get_mut(&(transport, proxy))
            .and_then(|r| r.udp.as_mut())
        {
            u.holders
                .retain(|h| h.strong_count() > 0 && !std::ptr::eq(h.as_ptr(), Arc::as_ptr(entry)));
            if !u.holders.is_empty() {
                return; // another socket of ours still holds the address
            }
        }
        let Some(mut reg) = self.regs.remove(&(transport, proxy)) else {
            return;
        };
        if let Some(conn) = reg.standby.take().and_then(|s| s.conn) {
            self.drop_standby(conn);
        }
        self.leave_epolls_if_idle();
        if reg.inode != 0 && held_elsewhere(reg.inode) {
            crate::debug!(
                "closed our copy of {} (proxy {}); another process still holds it",
                reg.local,
                proxy
            );
            return;
        }
        crate::info!("unregistering proxy {} ({})", proxy, reg.local);
        if self.recent.len() >= 256 {
            self.recent.retain(|_, (_, at)| at.elapsed() < RECENT_TTL);
        }
        self.recent
            .insert((transport, reg.local), (proxy, Instant::now()));
        self.send_unregister(reg.chan, transport, proxy);
    }

    pub(super) fn reregister(&mut self, old: RegKey) {
        let old_proxy = old.1;
        let Some(reg) = self.regs.get(&old) else {
            return;
        };
        let (local, chan) = (reg.local, reg.chan);
        let transport = if reg.udp.is_some() {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let to = SocketAddr::V4(reg.broker);
        let previous_token = self.proof_for(transport, SocketAddr::V4(old_proxy));
        let punch = transport == Transport::Tcp && self.punch_wait().is_some();
        let Some(c) = self.chan(chan) else { return };
        if c.pending
            .values()
            .any(|p| matches!(p, Pending::Reregister { old: o } if *o == old))
        {
            return;
        }
        let body = Body::Register {
            transport,
            local: SocketAddr::V4(local),
            previous_proxy: Some(SocketAddr::V4(old_proxy)),
            previous_token,
            punch,
        };
        if let Ok(id) = c.ep.send_request(now(), to, body) {
            c.pending.insert(id, Pending::Reregister { old });
        }
    }

    pub(super) fn on_reregistered(&mut self, old: RegKey, body: Body) {
        let old_proxy = old.1;
        if let Body::Registered { lease_ms, .. } = &body {
            self.fit_heartbeat(*lease_ms);
        }
        let Body::Registered { proxy, token, .. } = body else {
            crate::notice!(
                Error,
                RegisterRefused,
                "broker {} refused to re-register {}: {:?}; will retry (pid {})",
                old_proxy.ip(),
                old_proxy,
                body,
                getpid()
            );
            return;
        };
        let Some(proxy) = net::v4(proxy) else { return };
        if !self.regs.contains_key(&old) {
            return;
        }
        let transport = old.0;
        let token = self.take_token(transport, proxy, token.as_deref());
        let Some(mut reg) = self.regs.remove(&old) else {
            return;
        };
        if reg.udp.is_none() {
            // A new registration has a new standby key: the old standby is refused.
            if let Some(conn) = reg.standby.take().and_then(|s| s.conn) {
                self.drop_standby(conn);
            }
            let mine = self
                .families
                .iter()
                .any(|c| c.id == reg.chan && c.creator == getpid());
            if mine {
                reg.standby = self.standby_slot(token.as_deref());
            }
        }
        if let (Some(u), Some(t)) = (reg.udp.as_mut(), token) {
            // A new registration has a new token: punch again with it.
            u.token = t.into_bytes();
            u.quick_left = DUMMY_REPEATS;
            u.next_dummy = Instant::now();
        }
        if proxy != old_proxy {
            crate::warn!(
                "re-registered {} with a NEW proxy {} (the old {} was taken)",
                reg.local,
                proxy,
                old_proxy
            );
            if let Some(entry) = reg.entry.upgrade() {
                set_listener_proxy(&entry, proxy);
            }
        } else {
            crate::info!("re-registered {} as proxy {}", reg.local, proxy);
        }
        self.regs.insert((old.0, proxy), reg);
    }
}
