//! A control channel: a UDP socket of the shim's, connected to one daemon (the GCB broker
//! or the DPF server), driving a sans-IO reliable-UDP [`Endpoint`] from `gcb-proto`.
//! Used by the GCB and DPF clients; runs with the re-entrancy guard set.

use gcb_proto::{Body, Endpoint, Event, Now, PoolKey, RequestId};
use libc::c_int;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fdtable::{self, ShimFd};
use crate::net;
pub use crate::procid::getpid;

/// How long a request is retransmitted before it times out.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

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

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: b is a writable 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n != 8 {
        // Not security relevant (it only spreads message ids and channel ids).
        let t = now();
        return t.unix_ms ^ ((getpid() as u64) << 32);
    }
    u64::from_ne_bytes(b)
}

/// The outcome of a request somebody waits for.
pub enum Answer {
    Body(Body),
    Timeout,
}

pub fn endpoint(key: &Option<PoolKey>) -> Endpoint {
    // Faster retransmission than the default: the shim blocks the program while it
    // waits, and the control path may be lossy (30 % in the lab's fault tests).
    let cfg = gcb_proto::Config {
        initial_rto: Duration::from_millis(100),
        max_rto: Duration::from_millis(500),
        request_deadline: REQUEST_DEADLINE,
        ..gcb_proto::Config::default()
    };
    Endpoint::new(cfg, key.clone(), random_u64())
}

/// Close a shim-owned fd and forget it.
pub fn drop_owned(s: &Arc<ShimFd>) {
    drop(fdtable::remove(s.fd()));
    s.close();
}

/// A UDP socket connected to a daemon, with its endpoint. `P` says what each request in
/// flight is for.
pub struct Channel<P> {
    pub id: u64,
    pub fd: Arc<ShimFd>,
    pub ep: Endpoint,
    pub pending: HashMap<RequestId, P>,
    pub answers: HashMap<RequestId, Answer>,
    /// The process that created it (some channels are shared with descendants).
    pub creator: i32,
    /// The daemon it is connected to (one broker of a pool).
    pub peer: SocketAddrV4,
}

impl<P> Channel<P> {
    /// A new channel to `peer`; also returns our IP on the route to it.
    pub fn open(
        peer: SocketAddrV4,
        key: &Option<PoolKey>,
    ) -> Result<(Self, Option<Ipv4Addr>), c_int> {
        let fd = net::socket(libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, false)?;
        if let Err(e) = net::connect_raw(fd, peer) {
            net::close(fd);
            return Err(e);
        }
        let local_ip = net::sock_name(fd, false).map(|a| *a.ip());
        let owned = fdtable::own_fd(fd, "gcb-control")?;
        Ok((Self::adopt(owned, key, getpid(), peer), local_ip))
    }

    /// A channel on the connected socket `fd` (inherited across exec), to `peer`.
    pub fn adopt(fd: Arc<ShimFd>, key: &Option<PoolKey>, creator: i32, peer: SocketAddrV4) -> Self {
        Channel {
            peer,
            id: random_u64(),
            fd,
            ep: endpoint(key),
            pending: HashMap::new(),
            answers: HashMap::new(),
            creator,
        }
    }

    /// Send what the endpoint has queued.
    pub fn flush(&mut self) {
        let fd = self.fd.fd();
        while let Some(t) = self.ep.poll_transmit() {
            if let Err(e) = net::send_some(fd, &t.payload) {
                // Lost like any datagram; the endpoint retransmits.
                crate::trace!("control send failed: {}", net::errstr(e));
            }
        }
    }

    /// Read what arrived and run timers; returns the endpoint's events.
    pub fn poll(&mut self, from: SocketAddr) -> Vec<Event> {
        let fd = self.fd.fd();
        let mut buf = [0u8; 2048];
        // Until EAGAIN (or ECONNREFUSED from an ICMP error): nothing (more) to read.
        while let Ok(n) = net::recv_some(fd, &mut buf) {
            self.ep.handle_datagram(now(), from, &buf[..n]);
        }
        self.ep.handle_timeout(now());
        std::iter::from_fn(|| self.ep.poll_event()).collect()
    }

    pub fn close(self) {
        drop_owned(&self.fd);
    }
}

/// A channel whose only traffic is our own blocking requests (the DPF client's).
impl Channel<()> {
    /// Send `body` and wait for its answer (or the deadline).
    pub fn request(
        &mut self,
        to: SocketAddrV4,
        body: Body,
        deadline: Duration,
    ) -> Result<Answer, c_int> {
        let to = SocketAddr::V4(to);
        let id = self
            .ep
            .send_request_with_deadline(now(), to, body, deadline)
            .map_err(|_| libc::ENOBUFS)?;
        self.pending.insert(id, ());
        loop {
            self.flush();
            for ev in self.poll(to) {
                match ev {
                    Event::Response { request, body, .. } => {
                        if self.pending.remove(&request).is_some() {
                            self.answers.insert(request, Answer::Body(body));
                        }
                    }
                    Event::Timeout { request, .. } => {
                        if self.pending.remove(&request).is_some() {
                            self.answers.insert(request, Answer::Timeout);
                        }
                    }
                    Event::Request { from, id, body } => {
                        let reply = Body::error(
                            gcb_proto::ErrorCode::Unsupported,
                            format!("a client does not serve {}", body.type_name()),
                        );
                        let _ = self.ep.respond(now(), from, id, reply);
                    }
                }
            }
            if let Some(a) = self.answers.remove(&id) {
                self.answers.clear();
                return Ok(a);
            }
            self.flush();
            let left = self
                .ep
                .poll_timeout()
                .map_or(Duration::from_millis(100), |w| {
                    w.saturating_duration_since(Instant::now())
                });
            let _ = net::wait_fd(
                self.fd.fd(),
                libc::POLLIN,
                left.min(Duration::from_millis(100)),
            );
        }
    }
}
