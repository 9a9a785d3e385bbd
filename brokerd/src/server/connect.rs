//! Brokering TCP connections: `connect_request` decisions (paper 4.1), connections
//! arriving at proxy listeners, the connect ids waiting for their pair, and the relay
//! limits that admit them.

use std::io::{self};
use std::net::{IpAddr, SocketAddr};

use gcb_proto::{Body, ConnectId, ErrorCode, RequestId, Route, Transport};
use tracing::{info, warn};

use crate::decision::{canonical, decide, Decision, Party};

use super::state::{hex, reset, would_block, Deferred, Outgoing, Pending, Server};

impl Server {
    pub(super) fn on_connect_request(
        &mut self,
        from: SocketAddr,
        proxy: SocketAddr,
        transport: Transport,
        connector_local: SocketAddr,
        connector_listen: Option<SocketAddr>,
        punch: bool,
    ) -> Body {
        if transport != Transport::Tcp {
            // GCB UDP senders send to the proxy like any sender: the
            // broker relays (paper 4.2.2). Hole punching is not brokered yet.
            return Body::error(
                ErrorCode::Unsupported,
                "udp connect_request is not supported: send to the proxy address",
            );
        }
        let Some(reg) = self.registry.get(Transport::Tcp, &proxy).cloned() else {
            return Body::error(
                ErrorCode::NoSuchRegistration,
                format!("no registration for {proxy}"),
            );
        };
        let l = Party {
            observed: reg.observed,
            local: reg.local,
        };
        let c = Party {
            observed: from,
            local: connector_local,
        };
        // Without a pool key nothing proves the request came from `from`: the listener is
        // not asked to dial anything for it (no reverse, no claim, no connect_back) until
        // the connector's own TCP connection shows up at the relay port.
        let authenticated = self.cfg.key.is_some();
        let decision = match decide(&l, &c, connector_listen) {
            Decision::Reverse(_) if !authenticated => Decision::Relay,
            d => d,
        };
        let route = match decision {
            Decision::Direct(addr) => {
                self.counters.direct += 1;
                Route::Direct { addr }
            }
            Decision::Reverse(dial) => {
                self.counters.reverse += 1;
                let raw = self.random16();
                let body = Body::ConnectBack {
                    connect_id: ConnectId::from_bytes(raw),
                    dial,
                    proxy,
                    logical_peer: dial,
                };
                let pid = self.connect_presentation(&raw);
                if self
                    .send(reg.observed, body, Outgoing::ConnectBack(pid))
                    .is_none()
                {
                    return Body::error(ErrorCode::Busy, "cannot reach the listener now");
                }
                Route::Reverse {
                    connect_id: ConnectId::from_bytes(raw),
                }
            }
            Decision::Relay if authenticated && punch && self.punch_listeners.contains(&proxy) => {
                let (a, b) = (canonical(from.ip()), canonical(reg.observed.ip()));
                if self.punch_memo.recently_failed(a, b, self.now().mono) {
                    self.counters.punch_skipped += 1;
                    match self.relay_route(from, proxy, &reg, connector_listen, authenticated) {
                        Ok(r) => r,
                        Err(refusal) => return refusal,
                    }
                } else {
                    let raw = self.random16();
                    let pid = self.connect_presentation(&raw);
                    self.pending.insert(
                        pid,
                        Pending {
                            raw,
                            proxy,
                            // The connector's leg first; the listener's side is the
                            // standby the punch claims (or, after a fallback without one,
                            // its connect_back dial).
                            allowed: vec![a, b],
                            deferred: None,
                            waiting: None,
                            deadline: self.now().mono + self.cfg.connect_timeout,
                            connect_back: None,
                            punch: true,
                        },
                    );
                    Route::Punch {
                        addr: self.addr,
                        connect_id: ConnectId::from_bytes(raw),
                    }
                }
            }
            Decision::Relay => {
                match self.relay_route(from, proxy, &reg, connector_listen, authenticated) {
                    Ok(r) => r,
                    Err(refusal) => return refusal,
                }
            }
        };
        info!("connect {from} (local {connector_local}) -> proxy {proxy} (listener {} local {}): {route:?}", reg.observed, reg.local);
        Body::ConnectDecision { route }
    }

    /// A relay decision for `proxy`: a pairing waiting for the connector's relay
    /// connection, the listener's side asked for at once (a standby claim or a
    /// `connect_back`) when the request is authenticated. Err: the refusal to answer.
    fn relay_route(
        &mut self,
        from: SocketAddr,
        proxy: SocketAddr,
        reg: &crate::registry::Registration,
        connector_listen: Option<SocketAddr>,
        authenticated: bool,
    ) -> Result<Route, Body> {
        {
            {
                if self.relay_load() >= self.cfg.max_relays {
                    return Err(self.refuse(
                        from,
                        ErrorCode::Busy,
                        format!("relay limit ({}) reached", self.cfg.max_relays),
                    ));
                }
                self.counters.relay += 1;
                let raw = self.random16();
                let pid = self.connect_presentation(&raw);
                // The program sees the connector's dial-back address only when it is the
                // connector's own (as for a reverse); else its observed address.
                let peer = connector_listen
                    .filter(|a| canonical(a.ip()) == canonical(from.ip()))
                    .unwrap_or(from);
                let mut deferred = None;
                let connect_back = if !authenticated {
                    deferred = Some(Deferred {
                        connector_ip: canonical(from.ip()),
                        listener: reg.observed,
                        logical_peer: peer,
                    });
                    None
                } else if self.claim_standby(proxy, pid, reg.observed, peer) {
                    None
                } else {
                    let Some(req) = self.send_connect_back(&reg.observed, raw, proxy, peer) else {
                        return Err(Body::error(
                            ErrorCode::Busy,
                            "cannot reach the listener now",
                        ));
                    };
                    Some(req)
                };
                self.pending.insert(
                    pid,
                    Pending {
                        raw,
                        proxy,
                        allowed: vec![canonical(from.ip()), canonical(reg.observed.ip())],
                        deferred,
                        waiting: None,
                        deadline: self.now().mono + self.cfg.connect_timeout,
                        connect_back,
                        punch: false,
                    },
                );
                Ok(Route::Relay {
                    addr: self.addr,
                    connect_id: ConnectId::from_bytes(raw),
                })
            }
        }
    }

    /// Asks the listener to dial the relay port with connect id `raw` (its pairing is
    /// `pending[presentation of raw]`).
    pub(super) fn send_connect_back(
        &mut self,
        listener: &SocketAddr,
        raw: [u8; 16],
        proxy: SocketAddr,
        logical_peer: SocketAddr,
    ) -> Option<RequestId> {
        let body = Body::ConnectBack {
            connect_id: ConnectId::from_bytes(raw),
            dial: self.addr,
            proxy,
            logical_peer,
        };
        let pid = self.connect_presentation(&raw);
        self.send(*listener, body, Outgoing::ConnectBack(pid))
    }

    /// Relays running plus pairings waiting: the --max-relays budget.
    pub(super) fn relay_load(&self) -> usize {
        self.relays.len() + self.pending.len()
    }

    /// Whether a new pairing for `proxy` whose connector is `ip` fits the limits:
    /// broker-wide relays, pairings waiting per proxy and per connector IP, and
    /// relays plus waiting pairings per connector IP. Err: why not.
    pub(super) fn relay_admission(&self, ip: IpAddr, proxy: SocketAddr) -> Result<(), String> {
        if self.relay_load() >= self.cfg.max_relays {
            return Err(format!("relay limit ({}) reached", self.cfg.max_relays));
        }
        let for_proxy = self.pending.values().filter(|p| p.proxy == proxy).count();
        if for_proxy >= self.cfg.max_pending_per_proxy {
            return Err(format!(
                "{for_proxy} connections already wait for this listener (--max-pending-per-proxy)"
            ));
        }
        let waiting = self
            .connector_of
            .iter()
            .filter(|(id, c)| **c == ip && self.pending.contains_key(*id))
            .count();
        if waiting >= self.cfg.max_pending_per_ip {
            return Err(format!(
                "{waiting} connections from {ip} already wait for a listener (--max-pending-per-ip)"
            ));
        }
        let running = self
            .relays
            .values()
            .filter(|e| e.connector == Some(ip))
            .count();
        if running + waiting >= self.cfg.max_relays_per_ip {
            return Err(format!(
                "{} relays from {ip} (--max-relays-per-ip)",
                running + waiting
            ));
        }
        Ok(())
    }

    /// Records the connector IP of a relay or reverse decision's pairing.
    pub(super) fn note_connector(&mut self, reply: &Body, ip: IpAddr) {
        if let Body::ConnectDecision {
            route: Route::Relay { connect_id, .. } | Route::Reverse { connect_id },
        } = reply
        {
            // Pairings are keyed by the id's presentation (what the relay port reads).
            let id = self.connect_presentation(connect_id.as_bytes());
            self.connector_of.insert(id, ip);
        }
    }

    pub(super) fn on_proxy_accept(&mut self, proxy: SocketAddr) {
        loop {
            let Some((_, l)) = self.proxies.get(&proxy) else {
                return;
            };
            let (stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays queued; the
                    // sweep retries.
                    warn!("accept on proxy {proxy}: {e}");
                    self.retry_accept = true;
                    return;
                }
            };
            self.counters.proxy_accepts += 1;
            let Some(reg) = self.registry.get(Transport::Tcp, &proxy).cloned() else {
                return;
            };
            if let Err(why) = self.relay_admission(peer.ip(), proxy) {
                self.counters.conns_refused += 1;
                self.counters.relay_limit_refusals += 1;
                self.limit_hit("proxy-accept", || {
                    format!("refused connection from {peer} to proxy {proxy}: {why}")
                });
                reset(stream);
                continue;
            }
            let raw = self.random16();
            let id = self.connect_presentation(&raw);
            self.connector_of.insert(id, peer.ip());
            if self.claim_standby(proxy, id, reg.observed, peer) {
                // The connector's stream waits unread in the kernel until the splice.
                self.pending.insert(
                    id,
                    Pending {
                        raw,
                        proxy,
                        allowed: vec![canonical(reg.observed.ip())],
                        deferred: None,
                        waiting: Some((stream, peer)),
                        deadline: self.now().mono + self.cfg.connect_timeout,
                        connect_back: None,
                        punch: false,
                    },
                );
                info!(
                    "connection from {peer} to proxy {proxy}: standby claimed ({})",
                    hex(&id)
                );
                continue;
            }
            let Some(req) = self.send_connect_back(&reg.observed, raw, proxy, peer) else {
                self.counters.conns_refused += 1;
                reset(stream);
                continue;
            };
            info!(
                "connection from {peer} to proxy {proxy}: connect_back {} sent to {}",
                hex(&id),
                reg.observed
            );
            // The connector's stream is not registered with the poller and
            // not read: its bytes wait in the kernel until the splice.
            self.pending.insert(
                id,
                Pending {
                    raw,
                    proxy,
                    allowed: vec![canonical(reg.observed.ip())],
                    deferred: None,
                    waiting: Some((stream, peer)),
                    deadline: self.now().mono + self.cfg.connect_timeout,
                    connect_back: Some(req),
                    punch: false,
                },
            );
        }
    }
}
