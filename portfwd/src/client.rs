//! A small blocking client of the DPF protocol (used by `gcb-dpf-request`
//! and the tests): one UDP socket driving a gcb-proto [`Endpoint`].

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gcb_proto::{Body, Config, Endpoint, Event, Now, PoolKey, RequestId};

/// The current time for an [`Endpoint`].
pub fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// A random u64 from the kernel (an endpoint session). If the kernel has
/// none to give, the time and pid still make sessions of one host differ.
pub fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| now().unix_ms ^ u64::from(std::process::id()) << 32)
}

/// A DPF client talking to one server.
pub struct Client {
    sock: UdpSocket,
    ep: Endpoint,
    server: SocketAddr,
    /// How long a request is retransmitted (None: the protocol's default).
    deadline: Option<Duration>,
}

impl Client {
    /// Binds a UDP socket (`bind`, default `0.0.0.0:0`) for talking to `server`.
    pub fn new(
        server: SocketAddr,
        bind: Option<SocketAddr>,
        key: Option<PoolKey>,
    ) -> io::Result<Client> {
        let sock = UdpSocket::bind(bind.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))))?;
        Ok(Client {
            sock,
            ep: Endpoint::new(Config::default(), key, random_u64()),
            server,
            deadline: None,
        })
    }

    /// Gives up on a request after `d` instead of the protocol's default 10 s (an operator
    /// at a prompt wants to hear within seconds that nothing answers).
    pub fn set_request_deadline(&mut self, d: Duration) {
        self.deadline = Some(d);
    }

    /// The local address of the control socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Sends one request and waits for its reply (retransmitting); `Err`
    /// with `TimedOut` if none came before the deadline (10 s, or
    /// [`Self::set_request_deadline`]).
    pub fn request(&mut self, body: Body) -> io::Result<Body> {
        self.request_many(vec![body], 1)?
            .pop()
            .flatten()
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no reply from the DPF server"))
    }

    /// Sends `bodies` with at most `window` in flight; replies in order
    /// (`None`: timed out).
    pub fn request_many(
        &mut self,
        bodies: Vec<Body>,
        window: usize,
    ) -> io::Result<Vec<Option<Body>>> {
        let n = bodies.len();
        let mut out: Vec<Option<Body>> = vec![None; n];
        let mut done = 0;
        let mut next = 0;
        let mut bodies = bodies.into_iter();
        let mut inflight: HashMap<RequestId, usize> = HashMap::new();
        let mut buf = [0u8; 2048];
        while done < n {
            while inflight.len() < window.max(1) && next < n {
                let b = bodies.next().expect("counted");
                let sent = match self.deadline {
                    Some(d) => self.ep.send_request_with_deadline(now(), self.server, b, d),
                    None => self.ep.send_request(now(), self.server, b),
                };
                let id =
                    sent.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
                inflight.insert(id, next);
                next += 1;
            }
            while let Some(t) = self.ep.poll_transmit() {
                let _ = self.sock.send_to(&t.payload, t.to);
            }
            let wait = self
                .ep
                .poll_timeout()
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(100))
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            self.sock.set_read_timeout(Some(wait))?;
            match self.sock.recv_from(&mut buf) {
                Ok((len, from)) => self.ep.handle_datagram(now(), from, &buf[..len]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.ep.handle_timeout(now())
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
            self.ep.handle_timeout(now());
            while let Some(ev) = self.ep.poll_event() {
                match ev {
                    Event::Response { request, body, .. } => {
                        if let Some(i) = inflight.remove(&request) {
                            out[i] = Some(body);
                            done += 1;
                        }
                    }
                    Event::Timeout { request, .. } => {
                        if inflight.remove(&request).is_some() {
                            done += 1;
                        }
                    }
                    Event::Request { .. } => {}
                }
            }
        }
        Ok(out)
    }
}
