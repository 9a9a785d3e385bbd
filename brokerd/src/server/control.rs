//! The control plane: datagrams in and out through gcb-proto's `Endpoint`, each
//! request to its handler, and the answers to the broker's own requests.

use std::io::{self};
use std::net::SocketAddr;

use gcb_proto::{Body, ErrorCode, Event, RequestId, Transport};
use tracing::{debug, info, warn};

use crate::registry::RegistryError;

use super::state::{drop_conn, hex, transport_name, would_block, Outgoing, Server};

/// Datagrams read before the queued answers are sent (see `on_control`).
const CONTROL_FLUSH_EVERY: usize = 64;

impl Server {
    pub(super) fn on_control(&mut self) {
        let mut buf = [0u8; 2048];
        let mut handled = 0usize;
        loop {
            // A storm of requests can keep this loop going for thousands of datagrams:
            // answers go out as they are made, not piled up behind the endpoint's cap on
            // queued datagrams (beyond which they would be dropped and retransmitted for).
            handled += 1;
            if handled.is_multiple_of(CONTROL_FLUSH_EVERY) {
                self.flush_control();
            }
            match self.control.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if !self.cfg.allow.allows(from.ip()) {
                        self.counters.not_allowed += 1;
                        debug!("dropped datagram from {from}: not in --allow");
                        continue;
                    }
                    if !self.control_rate.allow(from.ip(), self.now().mono) {
                        self.counters.control_rate_limited += 1;
                        let (rate, burst) =
                            (self.cfg.control_rate_per_ip, self.cfg.control_burst_per_ip);
                        self.limit_hit("control-rate", || {
                            format!("control datagrams from {} over the per-IP rate limit ({rate}/s, burst {burst}): dropped", from.ip())
                        });
                        continue;
                    }
                    self.ep.handle_datagram(self.now(), from, &buf[..n]);
                    self.handle_events();
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors (ECONNREFUSED) surface here on Linux.
                    debug!("control recv: {e}");
                }
            }
        }
    }

    pub(super) fn flush_control(&mut self) {
        while let Some(t) = self.ep.poll_transmit() {
            match self.control.send_to(&t.payload, t.to) {
                Ok(_) => {}
                // Dropped: the reliable layer retransmits requests, and peers
                // retransmit their requests to get our replies again.
                Err(e) => debug!("control send to {}: {e}", t.to),
            }
        }
    }

    pub(super) fn handle_events(&mut self) {
        while let Some(ev) = self.ep.poll_event() {
            match ev {
                Event::Request { from, id, body } => {
                    debug!("{from} -> {}", body.type_name());
                    let reply = self.on_request(from, body);
                    if let Err(e) = self.ep.respond(self.now(), from, id, reply) {
                        warn!("cannot answer {from}: {e}");
                    }
                }
                Event::Response {
                    from,
                    request,
                    body,
                } => self.on_response(from, request, Some(body)),
                Event::Timeout { to, request } => self.on_response(to, request, None),
            }
        }
    }

    pub(super) fn send(&mut self, to: SocketAddr, body: Body, what: Outgoing) -> Option<RequestId> {
        match self.ep.send_request(self.now(), to, body) {
            Ok(id) => {
                self.outgoing.insert(id, what);
                Some(id)
            }
            Err(e) => {
                warn!("cannot send to {to}: {e}");
                None
            }
        }
    }

    pub(super) fn refuse(&mut self, from: SocketAddr, code: ErrorCode, reason: String) -> Body {
        self.counters.refused += 1;
        // Rate-limited: a flood of refused requests must not flood the log.
        self.limit_hit("refused", || format!("refused {from}: {code}: {reason}"));
        Body::error(code, reason)
    }

    pub(super) fn on_request(&mut self, from: SocketAddr, body: Body) -> Body {
        if self.drain.is_some()
            && matches!(
                body,
                Body::Register { .. } | Body::ConnectRequest { .. } | Body::PunchRequest { .. }
            )
        {
            // The shim serves locally (register) or connects as if no broker (connect).
            return self.refuse(
                from,
                ErrorCode::Busy,
                "the broker is shutting down".to_owned(),
            );
        }
        match body {
            Body::Register {
                transport,
                local,
                previous_proxy,
                previous_token,
                punch,
            } => {
                let reply = self.on_register(
                    from,
                    transport,
                    local,
                    previous_proxy,
                    previous_token.as_deref(),
                );
                if let (Body::Registered { proxy, .. }, Transport::Tcp) = (&reply, transport) {
                    // Whether its standbys take punch claims (a shim that does not would
                    // drop the standby: the punch would only cost a fallback).
                    if punch {
                        self.punch_listeners.insert(*proxy);
                    } else {
                        self.punch_listeners.remove(proxy);
                    }
                }
                reply
            }
            Body::Unregister {
                proxy,
                transport,
                token,
            } => {
                let owned = [Transport::Tcp, Transport::Udp]
                    .into_iter()
                    .filter(|t| transport.is_none_or(|want| want == *t))
                    .find(|t| self.registry.get(*t, &proxy).is_some());
                if let Some(t) = owned {
                    if !self.ownership_proven(t, proxy, token.as_deref()) {
                        self.counters.ownership_refused += 1;
                        info!(
                            "refused unregister of {proxy} from {from}: no valid ownership proof"
                        );
                        return Body::error(
                            ErrorCode::NotOwner,
                            "unregister needs the registration's ownership proof",
                        );
                    }
                }
                match self.registry.remove(from, transport, proxy) {
                    Ok(r) => {
                        self.close_proxy(r.transport, r.proxy);
                        info!(
                            "unregistered proxy {} (local {}, client {from}, {})",
                            r.proxy,
                            r.local,
                            transport_name(r.transport)
                        );
                        Body::Ack {}
                    }
                    Err(e @ RegistryError::NotOwner(_)) => {
                        Body::error(ErrorCode::NotOwner, e.to_string())
                    }
                    Err(e) => Body::error(ErrorCode::NoSuchRegistration, e.to_string()),
                }
            }
            Body::Heartbeat { proxies } => {
                let t = self.now().mono;
                let unknown: Vec<SocketAddr> = proxies
                    .into_iter()
                    .filter(|p| !self.registry.renew(from, *p, t))
                    .collect();
                // Only to authenticated clients: an unkeyed heartbeat's source may be
                // spoofed, and a retransmitted request would multiply what a victim gets
                // (heartbeat_ack's `unknown` already makes the shim re-register).
                // In a restart storm (every client of the pool at once) it is skipped
                // once half the endpoint's outstanding requests are taken: the ack does
                // the job, and connect_backs need the other half.
                if self.cfg.key.is_some()
                    && !unknown.is_empty()
                    && !self.reregistering.contains(&from)
                    && self.ep.outstanding() < self.ep.config().max_outstanding / 2
                {
                    info!("heartbeat from unknown client {from} ({} unknown proxies): sending reregister_request", unknown.len());
                    if self
                        .send(from, Body::ReregisterRequest {}, Outgoing::Reregister(from))
                        .is_some()
                    {
                        self.reregistering.insert(from);
                        self.counters.reregister_sent += 1;
                    }
                }
                Body::HeartbeatAck { unknown }
            }
            Body::ConnectRequest {
                proxy,
                transport,
                connector_local,
                connector_listen,
                punch,
            } => {
                if transport == Transport::Tcp {
                    if let Err(why) = self.relay_admission(from.ip(), proxy) {
                        self.counters.relay_limit_refusals += 1;
                        return self.refuse(from, ErrorCode::Busy, why);
                    }
                }
                let reply = self.on_connect_request(
                    from,
                    proxy,
                    transport,
                    connector_local,
                    connector_listen,
                    punch,
                );
                self.note_connector(&reply, from.ip());
                reply
            }
            Body::PunchRequest {
                proxy,
                from_proxy,
                token,
            } => self.on_punch_request(from, proxy, from_proxy, &token),
            other => Body::error(
                ErrorCode::BadRequest,
                format!("{} is not a request the broker serves", other.type_name()),
            ),
        }
    }

    pub(super) fn on_response(&mut self, peer: SocketAddr, request: RequestId, body: Option<Body>) {
        match self.outgoing.remove(&request) {
            Some(Outgoing::Reregister(c)) => {
                self.reregistering.remove(&c);
            }
            Some(Outgoing::ConnectBack(id)) => match body {
                Some(Body::Ack {}) => {
                    debug!("connect_back {} acked by {peer}", hex(&id));
                }
                other => {
                    self.counters.connect_back_failures += 1;
                    let why = match other {
                        None => "no answer".to_owned(),
                        Some(b) => format!("{b:?}"),
                    };
                    warn!("connect_back {} to listener {peer} failed: {why}", hex(&id));
                    if let Some(p) = self.pending.remove(&id) {
                        drop_conn(p.waiting);
                    }
                }
            },
            Some(Outgoing::PunchBack) if !matches!(body, Some(Body::Ack {})) => {
                self.udp.counters.punch_back_failures += 1;
                info!("punch_back to {peer} failed: {body:?}");
            }
            Some(Outgoing::PunchBack) => {}
            Some(Outgoing::PunchEnd) if !matches!(body, Some(Body::Ack {})) => {
                self.udp.counters.punch_end_failures += 1;
                info!("punch_end to {peer} failed: {body:?}");
            }
            Some(Outgoing::PunchEnd) => {}
            None => {}
        }
    }
}
