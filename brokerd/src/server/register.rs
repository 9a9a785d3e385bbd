//! Registrations: `register`, the proxy sockets they get (TCP listener or UDP
//! socket), closing a proxy (reserved for its owner a while), and UDP hole-punch
//! brokering between two UDP registrations.

use std::io::{self};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use gcb_proto::token::{self, Use};
use gcb_proto::{Body, ErrorCode, Transport};
use mio::net::{TcpListener, UdpSocket};
use mio::Interest;
use tracing::{debug, error, info};

use crate::decision::canonical;
use crate::udpproxy::{PunchEnd, UdpProxy};

use super::config::PortRange;
use super::state::{hex, transport_name, v4_of, Outgoing, Owner, Server};

/// How long a proxy IP found without a free port is skipped before it is searched again
/// (ports free up as registrations end and reservations lapse).
const PROXY_IP_FULL_RECHECK: Duration = Duration::from_secs(1);

/// Why no proxy socket could be bound for a registration.
#[derive(Debug, thiserror::Error)]
pub(super) enum ProxyBindError {
    /// Every port of `--proxy-ports` is some registration's proxy, reserved for its
    /// owner, or taken by another program: the registration is refused (`port_range`).
    #[error("proxy port range {range} exhausted: every port is in use{}",
        if *in_use_elsewhere { " (some by other programs)" } else { "" })]
    RangeExhausted {
        /// The configured range.
        range: PortRange,
        /// Whether some port was free of registrations but taken by another socket.
        in_use_elsewhere: bool,
    },
    /// The socket calls failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Server {
    pub(super) fn on_register(
        &mut self,
        from: SocketAddr,
        transport: Transport,
        local: SocketAddr,
        previous_proxy: Option<SocketAddr>,
        previous_token: Option<&str>,
    ) -> Body {
        let lease_ms = self.registry.lease().as_millis() as u64;
        if transport == Transport::Udp && !self.addr.is_ipv4() {
            return Body::error(
                ErrorCode::Unsupported,
                "udp registrations need a broker listening on IPv4",
            );
        }
        if let Some(proxy) = self
            .registry
            .existing(from, local, transport, self.now().mono)
        {
            debug!(
                "duplicate register from {from} for {} {local}: proxy {proxy}",
                transport_name(transport)
            );
            return Body::Registered {
                proxy,
                lease_ms,
                token: Some(self.token_hex(transport, proxy)),
            };
        }
        if let Err(e) = self.registry.check_quota(from) {
            return self.refuse(from, ErrorCode::Quota, e.to_string());
        }
        // Lapsed reservations are dropped at most once a second: a walk of the whole
        // map per registration made a pool re-registering after a mass lease expiry
        // (every proxy reserved) quadratic. `fresh_port_free` ignores lapsed ones.
        let t = self.now().mono;
        if t >= self.next_reserved_purge {
            self.reserved.retain(|_, until| *until > t);
            self.next_reserved_purge = t + Duration::from_secs(1);
        }
        // The old address only with the old registration's proof: otherwise whoever asks
        // first after a broker restart or an unregister would take over its clients.
        let previous_proxy = match previous_proxy {
            // The other transport's proof counts too: a program keeps one port number
            // for TCP and UDP (the shim asks for its sibling registration's proxy).
            Some(p)
                if self.ownership_proven(Transport::Tcp, p, previous_token)
                    || self.ownership_proven(Transport::Udp, p, previous_token) =>
            {
                Some(p)
            }
            Some(p) => {
                self.counters.ownership_refused += 1;
                info!("register from {from}: no valid ownership proof for previous proxy {p}; assigning a new one"
                );
                None
            }
            None => None,
        };
        let bound = match transport {
            Transport::Tcp => self.bind_tcp_proxy(from, previous_proxy),
            Transport::Udp => self.bind_udp_proxy(from, local, previous_proxy),
        };
        let proxy = match bound {
            Ok((proxy, _)) => {
                self.reserved.remove(&(transport, proxy));
                if transport == Transport::Tcp {
                    let key = self.presentation(Use::Standby, Transport::Tcp, proxy);
                    self.standby.key_for(proxy, || key);
                }
                proxy
            }
            Err(e @ ProxyBindError::RangeExhausted { .. }) => {
                self.counters.proxy_ports_exhausted += 1;
                self.counters.refused += 1;
                // Listeners refused retry (every 30 s at most, each): one line a minute
                // says it while it lasts, the counter says how often.
                self.limit_hit_every("proxy-ports", Duration::from_secs(60), || {
                    format!(
                        "refused {} registration from {from}: {e}",
                        transport_name(transport)
                    )
                });
                return Body::error(ErrorCode::PortRange, e.to_string());
            }
            Err(ProxyBindError::Io(e)) => {
                error!("cannot bind a proxy socket: {e}");
                return Body::error(
                    ErrorCode::Internal,
                    format!("cannot bind a proxy socket: {e}"),
                );
            }
        };
        self.registry
            .insert(from, local, transport, proxy, self.now().mono);
        self.counters.registered += 1;
        match transport {
            Transport::Tcp => {
                info!("registered tcp listener local {local} client {from} -> proxy {proxy}")
            }
            Transport::Udp => {
                info!("registered udp socket local {local} client {from} -> proxy {proxy}")
            }
        }
        Body::Registered {
            proxy,
            lease_ms,
            token: Some(self.token_hex(transport, proxy)),
        }
    }

    /// The proxy IPs for `transport`, in the order they are filled: (IP to bind, IP
    /// advertised). The broker's own first, then (TCP only) each `Config::proxy_ips`.
    fn proxy_ips(&self, transport: Transport) -> Vec<(IpAddr, IpAddr)> {
        let mut v = vec![(self.bound.ip(), self.addr.ip())];
        if transport == Transport::Tcp {
            v.extend(self.cfg.proxy_ips.iter().map(|ip| (*ip, *ip)));
        }
        v
    }

    /// Whether `prev` can be asked for again for `transport`: on one of our proxy IPs
    /// (advertised), in the proxy port range if there is one, not the control / relay
    /// port, and not another registration's proxy of that transport. (The other
    /// transport's proxy on the same port is fine: a program that uses one port number
    /// for TCP and UDP keeps one number through the broker too.) Returns it with the IP
    /// to bind.
    pub(super) fn previous_usable(
        &self,
        transport: Transport,
        prev: Option<SocketAddr>,
    ) -> Option<(SocketAddr, IpAddr)> {
        let p = prev?;
        let (bind_ip, _) = self
            .proxy_ips(transport)
            .into_iter()
            .find(|(_, adv)| *adv == p.ip())?;
        let usable = p.port() != 0
            && p.port() != self.addr.port()
            && self.cfg.proxy_ports.is_none_or(|r| r.contains(p.port()))
            && self.registry.get(transport, &p).is_none();
        usable.then_some((p, bind_ip))
    }

    /// Whether the port of proxy address `a` is free for a new registration: no
    /// registration's proxy of either transport and not reserved for an owner (so that a
    /// later registration of the other transport can ask for the same number).
    fn fresh_port_free(&self, a: SocketAddr) -> bool {
        let now = self.now().mono;
        let reserved = |t| self.reserved.get(&(t, a)).is_some_and(|until| *until > now);
        self.registry.get(Transport::Tcp, &a).is_none()
            && self.registry.get(Transport::Udp, &a).is_none()
            && !reserved(Transport::Tcp)
            && !reserved(Transport::Udp)
    }

    /// Binds a proxy socket with `bind`: at `prev` if usable, else at a port (from
    /// `--proxy-ports`, else ephemeral) not already some registration's proxy, on the
    /// first proxy IP with one free ([`Self::proxy_ips`]; an IP found full is skipped
    /// for [`PROXY_IP_FULL_RECHECK`]). Returns the socket and its proxy address: the
    /// advertised IP, that port.
    pub(super) fn bind_proxy_socket<S>(
        &mut self,
        transport: Transport,
        from: SocketAddr,
        prev: Option<SocketAddr>,
        bind: impl Fn(SocketAddr) -> io::Result<S>,
        addr_of: impl Fn(&S) -> io::Result<SocketAddr>,
    ) -> Result<(S, SocketAddr), ProxyBindError> {
        if let Some(prev) = prev {
            if let Some((p, bind_ip)) = self.previous_usable(transport, Some(prev)) {
                match bind(SocketAddr::new(bind_ip, p.port())) {
                    Ok(s) => return Ok((s, p)),
                    Err(e) => info!(
                        "previous proxy {p} for {from} unavailable ({e}); assigning a new one"
                    ),
                }
            } else {
                info!("previous proxy {prev} for {from} unavailable (not ours, outside the proxy ports or in use); assigning a new one"
                );
            }
        }
        let now = self.now().mono;
        self.proxy_ip_full.retain(|_, until| *until > now);
        let ips = self.proxy_ips(transport);
        let mut last = None;
        for (bind_ip, adv_ip) in ips {
            if self.proxy_ip_full.contains_key(&adv_ip) {
                continue;
            }
            let r = match self.cfg.proxy_ports {
                Some(range) => self.bind_in_range(range, bind_ip, adv_ip, &bind),
                None => self.bind_ephemeral(bind_ip, adv_ip, &bind, &addr_of),
            };
            match r {
                Err(e @ ProxyBindError::RangeExhausted { .. }) => {
                    self.proxy_ip_full
                        .insert(adv_ip, now + PROXY_IP_FULL_RECHECK);
                    last = Some(e);
                }
                Err(ProxyBindError::Io(e)) if e.kind() == io::ErrorKind::AddrInUse => {
                    self.proxy_ip_full
                        .insert(adv_ip, now + PROXY_IP_FULL_RECHECK);
                    last = Some(ProxyBindError::Io(e));
                }
                r => return r,
            }
        }
        Err(last.unwrap_or(match self.cfg.proxy_ports {
            Some(range) => ProxyBindError::RangeExhausted {
                range,
                in_use_elsewhere: false,
            },
            None => ProxyBindError::Io(io::Error::new(
                io::ErrorKind::AddrInUse,
                "every proxy IP is out of ephemeral ports",
            )),
        }))
    }

    /// One pass round `range` on one proxy IP from where the last search there stopped.
    fn bind_in_range<S>(
        &mut self,
        range: PortRange,
        bind_ip: IpAddr,
        adv_ip: IpAddr,
        bind: &impl Fn(SocketAddr) -> io::Result<S>,
    ) -> Result<(S, SocketAddr), ProxyBindError> {
        let next = self.next_proxy_port.get(&adv_ip).copied().unwrap_or(0);
        let start = if range.contains(next) { next } else { range.lo };
        let mut last_err = None;
        for i in 0..range.len() {
            let port = range.lo + ((usize::from(start - range.lo) + i) % range.len()) as u16;
            let a = SocketAddr::new(adv_ip, port);
            if port == self.addr.port() || !self.fresh_port_free(a) {
                continue;
            }
            match bind(SocketAddr::new(bind_ip, port)) {
                Ok(s) => {
                    let next = if port == range.hi { range.lo } else { port + 1 };
                    self.next_proxy_port.insert(adv_ip, next);
                    return Ok((s, a));
                }
                // Taken by another program (or the other transport's socket of a
                // registration being set up): try the next one.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
                Err(e) => return Err(ProxyBindError::Io(e)),
            }
        }
        Err(ProxyBindError::RangeExhausted {
            range,
            in_use_elsewhere: last_err.is_some(),
        })
    }

    /// An ephemeral port on one proxy IP (`AddrInUse` when the kernel has none left).
    fn bind_ephemeral<S>(
        &mut self,
        bind_ip: IpAddr,
        adv_ip: IpAddr,
        bind: &impl Fn(SocketAddr) -> io::Result<S>,
        addr_of: &impl Fn(&S) -> io::Result<SocketAddr>,
    ) -> Result<(S, SocketAddr), ProxyBindError> {
        // TCP and UDP ephemeral ports are drawn independently: a port the
        // other transport's proxy already has is skipped (held open while
        // drawing again so the kernel picks another).
        let mut skipped = Vec::new();
        for _ in 0..16 {
            let s = bind(SocketAddr::new(bind_ip, 0))?;
            let a = SocketAddr::new(adv_ip, addr_of(&s)?.port());
            // A fresh port is kept free of the other transport's proxies too, so
            // that a later registration can ask for the same number.
            if self.fresh_port_free(a) {
                return Ok((s, a));
            }
            skipped.push(s);
        }
        Err(ProxyBindError::Io(io::Error::other(
            "no proxy port free of other registrations",
        )))
    }

    pub(super) fn bind_tcp_proxy(
        &mut self,
        from: SocketAddr,
        previous_proxy: Option<SocketAddr>,
    ) -> Result<(SocketAddr, Option<String>), ProxyBindError> {
        let (mut listener, proxy) = self.bind_proxy_socket(
            Transport::Tcp,
            from,
            previous_proxy,
            TcpListener::bind,
            |l| l.local_addr(),
        )?;
        let token = self.token(Owner::Proxy(proxy));
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut listener, token, Interest::READABLE)
        {
            self.owners.remove(&token);
            return Err(e.into());
        }
        self.proxies.insert(proxy, (token, listener));
        Ok((proxy, None))
    }

    pub(super) fn bind_udp_proxy(
        &mut self,
        from: SocketAddr,
        local: SocketAddr,
        previous_proxy: Option<SocketAddr>,
    ) -> Result<(SocketAddr, Option<String>), ProxyBindError> {
        let (mut sock, proxy) =
            self.bind_proxy_socket(Transport::Udp, from, previous_proxy, UdpSocket::bind, |s| {
                s.local_addr()
            })?;
        // Bursts (iperf3 -u) must not overflow the default buffers (best
        // effort: the kernel caps them at net.core.{r,w}mem_max).
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(1 << 20);
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(1 << 20);
        let token = self.token(Owner::UdpProxy(proxy));
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)
        {
            self.owners.remove(&token);
            return Err(e.into());
        }
        let mut secret = [0u8; gcb_proto::UDP_TOKEN_LEN];
        secret.copy_from_slice(
            token::to_hex(&self.presentation(Use::UdpDummy, Transport::Udp, proxy)).as_bytes(),
        );
        let p = UdpProxy {
            sock,
            token,
            secret,
            owner_ip: canonical(from.ip()),
            data: None,
            local,
            punched: Vec::new(),
        };
        let t = p.token_string();
        self.udp.insert(proxy, p);
        Ok((proxy, Some(t)))
    }

    pub(super) fn on_udp_proxy(&mut self, proxy: SocketAddr) {
        let now = self.now().mono;
        if self.udp.on_readable(proxy, now) && !self.udp_backlog.contains(&proxy) {
            self.udp_backlog.push(proxy);
        }
    }

    pub(super) fn close_proxy(&mut self, transport: Transport, proxy: SocketAddr) {
        // Kept from other registrations for a while: its owner may be re-registering
        // (a restarted program, a lost lease) and its clients still know the address.
        self.reserved
            .insert((transport, proxy), self.now().mono + self.cfg.proxy_reserve);
        if transport == Transport::Tcp {
            if let Some((token, mut l)) = self.proxies.remove(&proxy) {
                let _ = self.poll.registry().deregister(&mut l);
                self.owners.remove(&token);
            }
            for (tok, mut p) in self.standby.drop_proxy(&proxy) {
                let _ = self.poll.registry().deregister(&mut p.stream);
                self.owners.remove(&tok);
            }
            return;
        }
        if let Some((mut p, ends)) = self.udp.remove(&proxy) {
            let _ = self.poll.registry().deregister(&mut p.sock);
            self.owners.remove(&p.token);
            self.udp_backlog.retain(|b| *b != proxy);
            for end in ends {
                self.send_punch_end(end);
            }
        }
    }

    /// Tells a registrant that a registration it was paired with for a hole punch is
    /// gone, so its shim stops sending direct frames to an address another program may
    /// take next (see [`gcb_proto::punch`]). Nothing if the partner is gone too.
    pub(super) fn send_punch_end(&mut self, end: PunchEnd) {
        let Some(observed) = self
            .registry
            .get(Transport::Udp, &end.to)
            .map(|r| r.observed)
        else {
            return;
        };
        let body = Body::PunchEnd {
            proxy: end.to,
            peer: end.peer,
            peer_proxy: end.peer_proxy,
        };
        if self.send(observed, body, Outgoing::PunchEnd).is_some() {
            self.udp.counters.punch_ends += 1;
            debug!(
                "punch_end to {} (client {observed}): {} (data {}) is gone",
                end.to, end.peer_proxy, end.peer
            );
        }
    }

    /// `punch_request` (GCB <-> GCB UDP hole punching, paper 4.2.1; see
    /// [`gcb_proto::punch`]): hands both registrants the other's data
    /// address and one fresh nonce. The broker only sends control messages
    /// here; the punch itself is between the two shims.
    pub(super) fn on_punch_request(
        &mut self,
        from: SocketAddr,
        proxy: SocketAddr,
        from_proxy: SocketAddr,
        token: &str,
    ) -> Body {
        let (dest_data, src_data) = match self.udp.punch_pair(&proxy, &from_proxy, token) {
            Ok(x) => x,
            Err((code, why)) => {
                info!("punch {from_proxy} -> {proxy} (client {from}) refused: {why}");
                return Body::error(code, why);
            }
        };
        let (Some(dest), Some(src)) = (
            self.registry.get(Transport::Udp, &proxy).cloned(),
            self.registry.get(Transport::Udp, &from_proxy).cloned(),
        ) else {
            self.udp.counters.punch_refused += 1;
            return Body::error(ErrorCode::NoSuchRegistration, "no such udp registration");
        };
        // Same public IP: both behind one NAT, which may not hairpin; the
        // private addresses are tried too.
        let same_nat = dest_data.ip() == src_data.ip();
        let nonce = hex(&self.random16());
        let back = Body::PunchBack {
            proxy,
            peer: src_data,
            peer_local: same_nat.then_some(src.local).and_then(v4_of),
            nonce: nonce.clone(),
        };
        if self
            .send(dest.observed, back, Outgoing::PunchBack)
            .is_none()
        {
            self.udp.counters.punch_refused += 1;
            return Body::error(ErrorCode::Busy, "cannot reach the destination now");
        }
        self.udp.counters.punches += 1;
        info!(
            "punch {from_proxy} (data {src_data}) <-> {proxy} (data {dest_data}){}",
            if same_nat { ", same NAT" } else { "" }
        );
        Body::Punch {
            peer: dest_data,
            peer_local: same_nat.then_some(dest.local).and_then(v4_of),
            me: src_data,
            nonce,
        }
    }
}
