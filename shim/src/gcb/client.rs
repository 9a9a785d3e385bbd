//! The GCB client of one process: its management (control) socket to the broker, the
//! reliable-UDP endpoint, the registrations of its listening sockets, and the
//! asynchronous event handler ([`Client::pump`]) that the interposed blocking calls run.
//!
//! All methods run with the re-entrancy guard set and the client lock held.

use gcb_proto::{Body, ConnectId, Endpoint, Event, Now, PoolKey, RequestId, Ticker, Transport};
use libc::c_int;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::net;
use super::GcbSock;
use crate::fdtable::{self, FdEntry, FdKind, ShimFd};

/// How long listen() waits for the broker before serving locally only.
pub const REGISTER_DEADLINE: Duration = Duration::from_secs(3);
/// How long connect() waits for a brokering decision.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Dial-backs and relay connections must be set up within this.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// A placeholder nobody accepts is dropped after this.
const READY_TTL: Duration = Duration::from_secs(60);
/// A destination the broker does not know (or an unreachable broker) is not asked again
/// for this long.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Length of the dial-back / relay preamble: `GCB-CONNECT <32 hex>\n`.
pub const PREAMBLE_LEN: usize = 45;

pub fn preamble(id: &ConnectId) -> Vec<u8> {
    format!("GCB-CONNECT {id}\n").into_bytes()
}

pub fn now() -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Now {
        mono: Instant::now(),
        unix_ms,
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: b is a writable 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n != 8 {
        // Not security relevant (the session only spreads message ids); mix what we have.
        let t = now();
        // SAFETY: getpid never fails.
        let pid = unsafe { libc::getpid() } as u64;
        return t.unix_ms ^ (pid << 32) ^ (t.mono.elapsed().as_nanos() as u64);
    }
    u64::from_ne_bytes(b)
}

/// One registered listening socket of this process.
struct Registration {
    /// The address registered as the socket's real local address.
    local: SocketAddrV4,
    /// Where a placeholder connection reaches the listening socket.
    listen_at: SocketAddrV4,
    /// The socket's table entry (to update its proxy after a re-registration).
    entry: Weak<FdEntry>,
}

/// A brokered connection waiting to come out of the program's accept().
struct Ready {
    fd: c_int,
    placeholder: Arc<ShimFd>,
    logical_peer: SocketAddrV4,
    since: Instant,
}

/// What a request in flight is for, when nobody blocks on it.
enum Pending {
    Heartbeat,
    Reregister {
        old_proxy: SocketAddrV4,
    },
    Unregister,
    /// A caller is blocked in [`Client::request`]; its answer goes to `answers`.
    Waiter,
}

pub enum Answer {
    Body(Body),
    Timeout,
}

pub struct Client {
    pub broker: SocketAddrV4,
    key: Option<PoolKey>,
    pid: i32,
    ctl: Option<Arc<ShimFd>>,
    /// Our IP on the route to the broker.
    pub local_ip: Option<Ipv4Addr>,
    ep: Endpoint,
    regs: HashMap<SocketAddrV4, Registration>,
    pending: HashMap<RequestId, Pending>,
    answers: HashMap<RequestId, Answer>,
    ready: HashMap<SocketAddrV4, Ready>,
    heartbeat: Ticker,
    /// Destinations (proxy candidates) not to broker, until the given time.
    negative: HashMap<SocketAddrV4, Instant>,
    /// Epoll sets our control socket has been added to.
    pub epolls: HashSet<c_int>,
}

fn endpoint_config() -> gcb_proto::Config {
    // Faster retransmission than the default: the shim blocks the program while it
    // waits, and the control path may be lossy (30 % in the lab's fault tests).
    gcb_proto::Config {
        initial_rto: Duration::from_millis(100),
        max_rto: Duration::from_millis(500),
        request_deadline: CONNECT_DEADLINE,
        ..gcb_proto::Config::default()
    }
}

impl Client {
    pub fn new(broker: SocketAddrV4, key: Option<PoolKey>) -> Client {
        Client {
            broker,
            ep: Endpoint::new(endpoint_config(), key.clone(), random_u64()),
            key,
            // SAFETY: getpid never fails.
            pid: unsafe { libc::getpid() },
            ctl: None,
            local_ip: None,
            regs: HashMap::new(),
            pending: HashMap::new(),
            answers: HashMap::new(),
            ready: HashMap::new(),
            heartbeat: Ticker::new(gcb_proto::rudp::HEARTBEAT_INTERVAL),
            negative: HashMap::new(),
            epolls: HashSet::new(),
        }
    }

    /// In a fork child: the parent keeps its registrations, control socket and queued
    /// connections; the child starts a client of its own (lazily).
    pub fn reset_after_fork(&mut self) {
        if let Some(ctl) = self.ctl.take() {
            drop_owned(&ctl);
        }
        for (_, r) in self.ready.drain() {
            net::close(r.fd);
            drop_owned(&r.placeholder);
        }
        self.regs.clear();
        self.pending.clear();
        self.answers.clear();
        self.epolls.clear();
        self.local_ip = None;
        self.ep = Endpoint::new(endpoint_config(), self.key.clone(), random_u64());
        // SAFETY: getpid never fails.
        self.pid = unsafe { libc::getpid() };
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Does the AEH need to run while the program waits?
    pub fn needs_aeh(&self) -> bool {
        self.ctl.is_some() && (!self.regs.is_empty() || !self.ready.is_empty())
    }

    pub fn ctl_fd(&self) -> Option<c_int> {
        self.ctl.as_ref().map(|c| c.fd())
    }

    /// The control socket, created on first use: UDP, connected to the broker (so the
    /// kernel drops datagrams from anyone else and tells us its route-local IP).
    pub fn ensure_ctl(&mut self) -> Result<c_int, c_int> {
        if let Some(c) = &self.ctl {
            return Ok(c.fd());
        }
        let fd = net::socket(libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, false)?;
        if let Err(e) = net::connect_raw(fd, self.broker) {
            net::close(fd);
            return Err(e);
        }
        self.local_ip = net::sock_name(fd, false).map(|a| *a.ip());
        let owned = fdtable::own_fd(fd, "gcb-control").inspect_err(|_| net::close(fd))?;
        let n = owned.fd();
        self.ctl = Some(owned);
        Ok(n)
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

    /// Send a request and run the AEH until its answer (or the deadline).
    pub fn request(&mut self, body: Body, deadline: Duration) -> Result<Answer, c_int> {
        self.ensure_ctl()?;
        let to = SocketAddr::V4(self.broker);
        let id = self
            .ep
            .send_request_with_deadline(now(), to, body, deadline)
            .map_err(|_| libc::ENOBUFS)?;
        self.pending.insert(id, Pending::Waiter);
        loop {
            self.flush();
            if let Some(a) = self.answers.remove(&id) {
                return Ok(a);
            }
            let wake = self.next_wakeup();
            let ctl = self.ctl_fd().ok_or(libc::EBADF)?;
            let left = wake.map_or(Duration::from_millis(100), |w| {
                w.saturating_duration_since(Instant::now())
            });
            let _ = net::wait_fd(ctl, libc::POLLIN, left);
            self.pump();
        }
    }

    /// When the AEH must run next even if nothing arrives.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut t = self.ep.poll_timeout();
        if !self.regs.is_empty() {
            let hb = self.heartbeat.next_due().unwrap_or_else(Instant::now);
            t = Some(t.map_or(hb, |x| x.min(hb)));
        }
        if let Some(oldest) = self.ready.values().map(|r| r.since + READY_TTL).min() {
            t = Some(t.map_or(oldest, |x| x.min(oldest)));
        }
        t
    }

    fn flush(&mut self) {
        let Some(ctl) = self.ctl_fd() else {
            while self.ep.poll_transmit().is_some() {}
            return;
        };
        while let Some(t) = self.ep.poll_transmit() {
            // SAFETY: payload is a valid readable buffer; ctl is connected to the broker.
            let n = unsafe {
                libc::send(
                    ctl,
                    t.payload.as_ptr() as *const libc::c_void,
                    t.payload.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                // Lost like any datagram; the endpoint retransmits.
                crate::trace!("control send failed: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// The asynchronous event handler: read the control socket, run timers, act on the
    /// broker's commands, send what is due. Never blocks longer than a dial-back.
    pub fn pump(&mut self) {
        let Some(ctl) = self.ctl_fd() else { return };
        let from = SocketAddr::V4(self.broker);
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe {
                libc::recv(
                    ctl,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e == Some(libc::EINTR) {
                    continue;
                }
                // EAGAIN, or ECONNREFUSED from an ICMP error: nothing to read.
                break;
            }
            self.ep.handle_datagram(now(), from, &buf[..n as usize]);
        }
        let t = now();
        self.ep.handle_timeout(t);
        if !self.regs.is_empty() && self.heartbeat.poll(t.mono) {
            let proxies: Vec<SocketAddr> = self.regs.keys().map(|p| SocketAddr::V4(*p)).collect();
            for body in gcb_proto::msg::heartbeat_batches(&proxies) {
                if let Ok(id) = self.ep.send_request(t, from, body) {
                    self.pending.insert(id, Pending::Heartbeat);
                }
            }
        }
        while let Some(ev) = self.ep.poll_event() {
            self.on_event(ev);
        }
        self.expire_ready(t.mono);
        self.flush();
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Request { from, id, body } => {
                let reply = match body {
                    Body::ConnectBack {
                        connect_id,
                        dial,
                        proxy,
                        logical_peer,
                    } => self.on_connect_back(connect_id, dial, proxy, logical_peer),
                    Body::ReregisterRequest {} => {
                        crate::info!("broker {} asks us to register again", self.broker);
                        self.reregister_all();
                        Body::Ack {}
                    }
                    other => Body::error(
                        gcb_proto::ErrorCode::Unsupported,
                        format!("a client does not serve {}", other.type_name()),
                    ),
                };
                let _ = self.ep.respond(now(), from, id, reply);
            }
            Event::Response { request, body, .. } => match self.pending.remove(&request) {
                Some(Pending::Waiter) => {
                    self.answers.insert(request, Answer::Body(body));
                }
                Some(Pending::Heartbeat) => {
                    if let Body::HeartbeatAck { unknown } = body {
                        for p in unknown.into_iter().filter_map(net::v4) {
                            self.reregister(p);
                        }
                    }
                }
                Some(Pending::Reregister { old_proxy }) => self.on_reregistered(old_proxy, body),
                Some(Pending::Unregister) | None => {}
            },
            Event::Timeout { request, .. } => match self.pending.remove(&request) {
                Some(Pending::Waiter) => {
                    self.answers.insert(request, Answer::Timeout);
                }
                Some(Pending::Heartbeat) => {
                    crate::debug!("heartbeat to broker {} unanswered", self.broker)
                }
                Some(Pending::Reregister { old_proxy }) => {
                    crate::warn!("re-registration of {} unanswered; will retry", old_proxy)
                }
                _ => {}
            },
        }
    }

    /// Register a listening socket; returns its proxy address.
    pub fn register(
        &mut self,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        entry: &Arc<FdEntry>,
        previous: Option<SocketAddrV4>,
    ) -> Result<SocketAddrV4, String> {
        let body = Body::Register {
            transport: Transport::Tcp,
            local: SocketAddr::V4(local),
            previous_proxy: previous.map(SocketAddr::V4),
        };
        match self.request(body, REGISTER_DEADLINE) {
            Err(e) => Err(format!(
                "cannot reach broker {}: {}",
                self.broker,
                std::io::Error::from_raw_os_error(e)
            )),
            Ok(Answer::Timeout) => Err(format!(
                "broker {} did not answer within {:?}",
                self.broker, REGISTER_DEADLINE
            )),
            Ok(Answer::Body(Body::Registered { proxy, .. })) => {
                let proxy = net::v4(proxy).ok_or("broker gave an IPv6 proxy")?;
                self.regs.insert(
                    proxy,
                    Registration {
                        local,
                        listen_at,
                        entry: Arc::downgrade(entry),
                    },
                );
                self.heartbeat.reset(Instant::now());
                Ok(proxy)
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

    /// The last fd of a registered listening socket was closed in the owning process.
    pub fn unregister(&mut self, proxy: SocketAddrV4) {
        if self.regs.remove(&proxy).is_none() {
            return;
        }
        crate::info!("unregistering proxy {}", proxy);
        let body = Body::Unregister {
            proxy: SocketAddr::V4(proxy),
        };
        if let Ok(id) = self
            .ep
            .send_request(now(), SocketAddr::V4(self.broker), body)
        {
            self.pending.insert(id, Pending::Unregister);
        }
        self.flush();
    }

    fn reregister_all(&mut self) {
        let proxies: Vec<SocketAddrV4> = self.regs.keys().copied().collect();
        for p in proxies {
            self.reregister(p);
        }
    }

    fn reregister(&mut self, old_proxy: SocketAddrV4) {
        let Some(reg) = self.regs.get(&old_proxy) else {
            return;
        };
        if self
            .pending
            .values()
            .any(|p| matches!(p, Pending::Reregister { old_proxy: o } if *o == old_proxy))
        {
            return;
        }
        let body = Body::Register {
            transport: Transport::Tcp,
            local: SocketAddr::V4(reg.local),
            previous_proxy: Some(SocketAddr::V4(old_proxy)),
        };
        if let Ok(id) = self
            .ep
            .send_request(now(), SocketAddr::V4(self.broker), body)
        {
            self.pending.insert(id, Pending::Reregister { old_proxy });
        }
    }

    fn on_reregistered(&mut self, old_proxy: SocketAddrV4, body: Body) {
        let Body::Registered { proxy, .. } = body else {
            crate::warn!(
                "re-registration of {} refused: {:?}; will retry",
                old_proxy,
                body
            );
            return;
        };
        let Some(proxy) = net::v4(proxy) else { return };
        let Some(reg) = self.regs.remove(&old_proxy) else {
            return;
        };
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
        self.regs.insert(proxy, reg);
    }

    /// The broker asks us to dial out for a connection to our listener at `proxy`.
    fn on_connect_back(
        &mut self,
        id: ConnectId,
        dial: SocketAddr,
        proxy: SocketAddr,
        peer: SocketAddr,
    ) -> Body {
        let (Some(dial), Some(proxy), Some(peer)) = (net::v4(dial), net::v4(proxy), net::v4(peer))
        else {
            return Body::error(gcb_proto::ErrorCode::BadRequest, "IPv4 only");
        };
        let Some(listen_at) = self.regs.get(&proxy).map(|r| r.listen_at) else {
            return Body::error(
                gcb_proto::ErrorCode::NoSuchRegistration,
                format!("{proxy} is not registered here"),
            );
        };
        match self.dial_back(&id, dial, listen_at) {
            Ok((fd, placeholder, key)) => {
                crate::debug!(
                    "connect_back for {}: dialed {} for peer {}; queued as {}",
                    proxy,
                    dial,
                    peer,
                    key
                );
                self.ready.insert(
                    key,
                    Ready {
                        fd,
                        placeholder,
                        logical_peer: peer,
                        since: Instant::now(),
                    },
                );
                Body::Ack {}
            }
            Err(why) => {
                crate::warn!("connect_back to {} for {} failed: {}", dial, proxy, why);
                Body::error(gcb_proto::ErrorCode::Internal, why)
            }
        }
    }

    /// Dial `dial`, present the connect id, and put a placeholder connection into the
    /// listening socket's kernel queue so accept()/select()/poll()/epoll() see it.
    fn dial_back(
        &mut self,
        id: &ConnectId,
        dial: SocketAddrV4,
        listen_at: SocketAddrV4,
    ) -> Result<(c_int, Arc<ShimFd>, SocketAddrV4), String> {
        let errs =
            |what: &str, e: c_int| format!("{what}: {}", std::io::Error::from_raw_os_error(e));
        // Inheritable: this becomes the program's connection.
        let fd = net::socket(libc::SOCK_STREAM, true).map_err(|e| errs("socket", e))?;
        let r = net::connect_timeout(fd, dial, DIAL_TIMEOUT)
            .map_err(|e| errs("dial", e))
            .and_then(|_| {
                net::write_all(fd, &preamble(id), DIAL_TIMEOUT).map_err(|e| errs("preamble", e))
            });
        if let Err(e) = r {
            net::close(fd);
            return Err(e);
        }
        let ph = match net::socket(libc::SOCK_STREAM, false) {
            Ok(ph) => ph,
            Err(e) => {
                net::close(fd);
                return Err(errs("placeholder socket", e));
            }
        };
        let key = net::connect_timeout(ph, listen_at, DIAL_TIMEOUT)
            .map_err(|e| errs("placeholder connect", e))
            .and_then(|_| net::sock_name(ph, false).ok_or_else(|| "placeholder name".to_owned()));
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                net::close(fd);
                net::close(ph);
                return Err(e);
            }
        };
        match fdtable::own_fd(ph, "gcb-placeholder") {
            Ok(owned) => Ok((fd, owned, key)),
            Err(e) => {
                net::close(fd);
                net::close(ph);
                Err(errs("placeholder fd", e))
            }
        }
    }

    /// accept() returned a connection from `peer`: if it is one of our placeholders, take
    /// the brokered connection it stands for.
    pub fn take_ready(&mut self, peer: SocketAddrV4) -> Option<(c_int, SocketAddrV4)> {
        let r = self.ready.remove(&peer)?;
        drop_owned(&r.placeholder);
        Some((r.fd, r.logical_peer))
    }

    fn expire_ready(&mut self, now: Instant) {
        let stale: Vec<SocketAddrV4> = self
            .ready
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.since) > READY_TTL)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(r) = self.ready.remove(&k) {
                crate::warn!(
                    "brokered connection from {} never accepted; closed",
                    r.logical_peer
                );
                net::close(r.fd);
                drop_owned(&r.placeholder);
            }
        }
    }
}

/// Close a shim-owned fd and forget it.
pub fn drop_owned(s: &Arc<ShimFd>) {
    let fd = s.fd();
    drop(fdtable::remove(fd));
    net::close(fd);
}

/// Update the proxy a listening socket reports.
pub fn set_listener_proxy(entry: &Arc<FdEntry>, proxy: SocketAddrV4) {
    if let FdKind::Socket(s) = &entry.kind {
        let mut st = s.state.lock();
        if let Some(GcbSock::Listener { proxy: p, .. }) =
            st.layer.as_mut().and_then(|l| l.downcast_mut::<GcbSock>())
        {
            *p = proxy;
        }
    }
}
