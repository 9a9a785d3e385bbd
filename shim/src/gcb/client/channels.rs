//! The client's control channels to the broker and the requests on them.
//!
//! * A **registration channel** (UDP socket connected to the broker) carries register,
//!   heartbeat and unregister requests, and receives the broker's `connect_back` and
//!   `reregister_request`. Like the paper's management socket it shares the fate of the
//!   registered sockets: it is inherited across fork (and handed across exec), so every
//!   process that holds a registered listener or UDP socket (socat `fork` children,
//!   pre-fork workers, a daemon's exec'd child) can serve the broker's commands, and the
//!   broker sees one client. Any holder sends heartbeats (and, for UDP, keepalives), so
//!   the registration lives while any process runs the AEH; it is removed when the last
//!   holder closes the socket.
//! * A **private channel** per process carries connect requests, so their answers are
//!   never read by a sibling process.
//!
//! Also here: the negative cache of destinations not to broker, fitting the heartbeat to
//! the broker's lease, unregistering, and leaving the program's epoll sets when the AEH
//! has nothing left to serve.

use gcb_proto::{Body, Ticker, Transport};
use libc::c_int;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::mailbox::Mailbox;
use super::state::{Channel, Client, Pending};
use crate::control::{getpid, now, Answer};
use crate::net;

/// How long connect() waits for a brokering decision.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// A destination the broker does not know (or an unreachable broker) is not asked again
/// for this long.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

impl Client {
    pub(super) fn ensure_local_ip(&mut self) {
        if self.local_ip.is_none() {
            self.local_ip = net::route_ip(self.broker);
        }
    }

    /// Our IP on the route to the broker.
    pub fn route_ip(&mut self) -> Option<Ipv4Addr> {
        self.ensure_local_ip();
        self.local_ip
    }

    /// This process's own registration channel to the pool's first broker (UDP sockets
    /// register there); see [`Self::own_family_to`].
    pub(super) fn own_family(&mut self) -> Result<u64, c_int> {
        self.own_family_to(self.broker)
    }

    /// This process's own registration channel to `broker` (and the family mailbox),
    /// created on first use; returns the channel's id.
    pub(super) fn own_family_to(&mut self, broker: SocketAddrV4) -> Result<u64, c_int> {
        let me = getpid();
        if let Some(c) = self
            .families
            .iter()
            .find(|c| c.creator == me && c.peer == broker)
        {
            return Ok(c.id);
        }
        if self.mailbox.is_none() {
            self.mailbox = Some(Mailbox::open()?);
        }
        let (c, ip) = Channel::open(broker, &self.key)?;
        if self.local_ip.is_none() && broker == self.broker {
            self.local_ip = ip;
        }
        let id = c.id;
        self.families.push(c);
        Ok(id)
    }

    /// This process's private channel to `broker`, created on first use.
    pub(super) fn private_channel(&mut self, broker: SocketAddrV4) -> Result<u64, c_int> {
        if let Some(c) = self.privates.iter().find(|c| c.peer == broker) {
            return Ok(c.id);
        }
        let (c, _) = Channel::open(broker, &self.key)?;
        let id = c.id;
        self.privates.push(c);
        Ok(id)
    }

    pub(super) fn chan(&mut self, id: u64) -> Option<&mut Channel> {
        if let Some(p) = self.privates.iter_mut().find(|p| p.id == id) {
            return Some(p);
        }
        self.families.iter_mut().find(|c| c.id == id)
    }

    /// The broker of the pool that owns `dest` if it may be one of its proxies: `dest`
    /// is on its IP and is not its control/relay port.
    pub fn owner_of(&self, dest: SocketAddrV4) -> Option<SocketAddrV4> {
        self.pool
            .iter()
            .find(|b| b.ip() == dest.ip() && b.port() != dest.port())
            .copied()
    }

    /// Is `ip` the address of a broker of the pool?
    pub fn is_pool_ip(&self, ip: Ipv4Addr) -> bool {
        self.pool.iter().any(|b| *b.ip() == ip)
    }

    /// Our IP on the route to `broker`.
    pub fn route_ip_to(&mut self, broker: SocketAddrV4) -> Option<Ipv4Addr> {
        if broker == self.broker {
            return self.route_ip();
        }
        net::route_ip(broker)
    }

    /// Send a request on channel `chan` and run the AEH until its answer (or deadline).
    pub(super) fn request_on(
        &mut self,
        chan: u64,
        body: Body,
        deadline: Duration,
    ) -> Result<Answer, c_int> {
        let c = self.chan(chan).ok_or(libc::EBADF)?;
        let to = SocketAddr::V4(c.peer);
        let id =
            c.ep.send_request_with_deadline(now(), to, body, deadline)
                .map_err(|_| libc::ENOBUFS)?;
        c.pending.insert(id, Pending::Waiter);
        loop {
            let c = self.chan(chan).ok_or(libc::EBADF)?;
            c.flush();
            if let Some(a) = c.answers.remove(&id) {
                return Ok(a);
            }
            let fd = c.fd.fd();
            let left = c.ep.poll_timeout().map_or(Duration::from_millis(100), |w| {
                w.saturating_duration_since(Instant::now())
            });
            let _ = net::wait_fd(fd, libc::POLLIN, left.min(Duration::from_millis(100)));
            self.pump();
        }
    }

    /// A connect request to `broker` on this process's private channel to it.
    pub fn request_to(
        &mut self,
        broker: SocketAddrV4,
        body: Body,
        deadline: Duration,
    ) -> Result<Answer, c_int> {
        let chan = self.private_channel(broker)?;
        self.request_on(chan, body, deadline)
    }

    fn negative_hit(&mut self, dest: SocketAddrV4, now: Instant) -> bool {
        match self.negative.get(&dest) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.negative.remove(&dest);
                false
            }
            None => false,
        }
    }

    pub fn is_negative(&mut self, dest: SocketAddrV4) -> bool {
        self.negative_hit(dest, Instant::now())
    }

    pub fn mark_negative(&mut self, dest: SocketAddrV4) {
        if self.negative.len() > 4096 {
            let now = Instant::now();
            self.negative.retain(|_, t| *t > now);
        }
        self.negative.insert(dest, Instant::now() + NEGATIVE_TTL);
    }

    /// Heartbeat at least three times per lease the broker grants, so one lost
    /// heartbeat never costs the registration.
    pub(super) fn fit_heartbeat(&mut self, lease_ms: u64) {
        let want = Duration::from_millis(lease_ms / 3).max(Duration::from_millis(50));
        if want < self.heartbeat.interval() {
            crate::debug!("broker lease {} ms: heartbeat every {:?}", lease_ms, want);
            self.heartbeat = Ticker::new(want.min(self.heartbeat_every));
            self.heartbeat.reset(Instant::now());
        }
    }

    /// Tells the broker (on channel `chan`) that `proxy` is no longer wanted.
    pub(super) fn send_unregister(&mut self, chan: u64, transport: Transport, proxy: SocketAddrV4) {
        let token = self.proofs.get(&(transport, proxy)).cloned();
        if let Some(c) = self.chan(chan) {
            let to = SocketAddr::V4(c.peer);
            let body = Body::Unregister {
                proxy: SocketAddr::V4(proxy),
                transport: Some(transport),
                token,
            };
            if let Ok(id) = c.ep.send_request(now(), to, body) {
                c.pending.insert(id, Pending::Unregister);
            }
            c.flush();
        }
    }

    /// When the AEH stops running in the program's waits (nothing left to serve), takes
    /// our control sockets out of the program's epoll sets, or their (tagged) events would
    /// reach the program.
    pub(super) fn leave_epolls_if_idle(&mut self) {
        if self.needs_aeh() {
            return;
        }
        for (epfd, fd) in self.epolls.drain() {
            // SAFETY: plain syscall; a stale pair just fails (ENOENT/EBADF).
            unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        }
    }
}
