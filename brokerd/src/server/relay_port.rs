//! The relay port: connections reading their 45-byte preamble, connect ids
//! presented there (pairing), and the spliced relays ([`crate::relay`]).

use std::io::{self, Read};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Token};
use tracing::{debug, error, info, warn};

use crate::decision::canonical;
use crate::relay::{Relay, RelayState};
use gcb_proto::preamble::{self, Preamble};

use super::state::{drop_conn, hex, reset, would_block, Owner, PreambleConn, RelayEntry, Server};

impl Server {
    pub(super) fn on_relay_accept(&mut self) {
        loop {
            let Some(listener) = &self.relay_listener else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("accept on relay port: {e}");
                    self.retry_accept = true;
                    return;
                }
            };
            if self.preambles.len() >= self.cfg.max_preambles {
                self.counters.conns_refused += 1;
                let n = self.preambles.len();
                self.limit_hit("preambles", || {
                    format!("refused relay-port connection from {peer}: {n} connections already reading a preamble")
                });
                reset(stream);
                continue;
            }
            let from_ip = self
                .preambles
                .values()
                .filter(|c| c.peer.ip() == peer.ip())
                .count();
            if from_ip >= self.cfg.max_preambles_per_ip {
                self.counters.conns_refused += 1;
                self.counters.preamble_limit_refusals += 1;
                let cap = self.cfg.max_preambles_per_ip;
                self.limit_hit("preambles-per-ip", || {
                    format!("refused relay-port connection from {peer}: per-IP preamble limit ({cap}) reached")
                });
                reset(stream);
                continue;
            }
            let token = match self.watch_readable(&mut stream, Owner::Preamble) {
                Ok(t) => t,
                Err(e) => {
                    warn!("register relay-port connection: {e}");
                    continue;
                }
            };
            self.preambles.insert(
                token,
                PreambleConn {
                    stream,
                    peer,
                    buf: [0; preamble::LEN],
                    got: 0,
                    deadline: self.now().mono + self.cfg.preamble_timeout,
                },
            );
            self.on_preamble(token);
        }
    }

    /// Registers `stream` for readability under a new token owned by `owner`.
    pub(super) fn watch_readable(
        &mut self,
        stream: &mut TcpStream,
        owner: Owner,
    ) -> io::Result<Token> {
        let tok = self.token(owner);
        if let Err(e) = self
            .poll
            .registry()
            .register(stream, tok, Interest::READABLE)
        {
            self.owners.remove(&tok);
            return Err(e);
        }
        Ok(tok)
    }

    pub(super) fn drop_preamble(&mut self, token: Token) -> Option<PreambleConn> {
        let mut c = self.preambles.remove(&token)?;
        self.owners.remove(&token);
        let _ = self.poll.registry().deregister(&mut c.stream);
        Some(c)
    }

    pub(super) fn on_preamble(&mut self, token: Token) {
        let Some(c) = self.preambles.get_mut(&token) else {
            return;
        };
        // Read exactly the preamble, never past it.
        let result = loop {
            if c.got == preamble::LEN {
                break Ok(true);
            }
            match c.stream.read(&mut c.buf[c.got..]) {
                Ok(0) if c.got == 0 => break Err(String::new()),
                Ok(0) => break Err("connection closed before the preamble".to_owned()),
                Ok(n) => {
                    c.got += n;
                    if let Err(e) = preamble::check_prefix(&c.buf[..c.got]) {
                        break Err(e.to_string());
                    }
                }
                Err(e) if would_block(&e) => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        match result {
            Ok(false) => {}
            Err(why) if why.is_empty() => {
                // Closed before sending anything: a connector's speculative dial that
                // its decision did not need. Not an error.
                if let Some(c) = self.drop_preamble(token) {
                    debug!("relay port: {} closed without a preamble", c.peer);
                }
            }
            Err(why) => {
                let c = self.drop_preamble(token);
                self.counters.bad_preambles += 1;
                if let Some(c) = c {
                    warn!("relay port: dropped {}: {why}", c.peer);
                    reset(c.stream);
                }
            }
            Ok(true) => {
                let Some(c) = self.drop_preamble(token) else {
                    return;
                };
                match preamble::parse_any(&c.buf) {
                    Ok(Preamble::Connect(id)) => self.on_arrival(id, c.stream, c.peer),
                    Ok(Preamble::Standby(key)) => self.on_standby(key, c.stream, c.peer),
                    Err(e) => {
                        self.counters.bad_preambles += 1;
                        warn!("relay port: dropped {}: {e}", c.peer);
                        reset(c.stream);
                    }
                }
            }
        }
    }

    /// A relay-port connection presented connect id `id` (its presentation, the key of
    /// `pending`).
    pub(super) fn on_arrival(&mut self, id: [u8; 16], stream: TcpStream, peer: SocketAddr) {
        let Some(p) = self.pending.get_mut(&id) else {
            self.counters.bad_preambles += 1;
            warn!(
                "relay port: {peer} presented unknown or used connect id {}",
                hex(&id)
            );
            reset(stream);
            return;
        };
        let ip = canonical(peer.ip());
        if !p.allowed.contains(&ip) {
            // The pairing stays: its real parties may still come.
            self.counters.bad_preambles += 1;
            self.counters.foreign_presentations += 1;
            warn!(
                "relay port: {peer} presented connect id {} bound to other addresses",
                hex(&id)
            );
            reset(stream);
            return;
        }
        if p.punch {
            if self.connector_of.get(&id) == Some(&ip) || p.allowed.first() == Some(&ip) {
                self.start_punch(id, stream, peer);
            } else {
                // Only the connector's leg starts a punch; the listener's side is a
                // standby the broker claims.
                self.counters.bad_preambles += 1;
                self.counters.foreign_presentations += 1;
                warn!(
                    "relay port: {peer} presented punch id {} but is not its connector",
                    hex(&id)
                );
                reset(stream);
            }
            return;
        }
        if p.deferred.as_ref().is_some_and(|d| d.connector_ip == ip) {
            // An unauthenticated relay decision: its connector is real. Now ask the
            // listener's side (a standby claim, else a connect_back).
            let d = p.deferred.take().expect("checked");
            let (raw, proxy) = (p.raw, p.proxy);
            p.waiting = Some((stream, peer));
            if !self.claim_standby(proxy, id, d.listener, d.logical_peer) {
                let req = self.send_connect_back(&d.listener, raw, proxy, d.logical_peer);
                match (req, self.pending.get_mut(&id)) {
                    (Some(req), Some(p)) => p.connect_back = Some(req),
                    (None, _) => {
                        if let Some(p) = self.pending.remove(&id) {
                            drop_conn(p.waiting);
                        }
                    }
                    _ => {}
                }
            }
            debug!("relay port: connector {peer} is first for {}", hex(&id));
            return;
        }
        if p.deferred.is_some() && p.waiting.is_none() {
            // The listener side before its connector: impossible unless forged.
            self.counters.bad_preambles += 1;
            warn!(
                "relay port: {peer} came before its connector for {}",
                hex(&id)
            );
            reset(stream);
            return;
        }
        match p.waiting.take() {
            None => {
                debug!("relay port: {peer} is first for {}", hex(&id));
                p.waiting = Some((stream, peer));
            }
            Some((first, first_peer)) => {
                let p = self.pending.remove(&id).expect("present");
                if let Some(req) = p.connect_back {
                    // The listener evidently got the message.
                    if self.outgoing.remove(&req).is_some() {
                        self.ep.cancel(req);
                    }
                }
                let label = format!(
                    "{first_peer} <-> {peer} (proxy {}, id {})",
                    p.proxy,
                    hex(&id)
                );
                self.start_relay(first, stream, label, id);
            }
        }
    }

    pub(super) fn start_relay(&mut self, a: TcpStream, b: TcpStream, label: String, id: [u8; 16]) {
        let connector = self.connector_of.remove(&id);
        let mut relay = match Relay::new(a, b, self.now().mono) {
            Ok(r) => r,
            Err(e) => {
                error!("cannot start relay {label}: {e}");
                return;
            }
        };
        let rid = self.next_token;
        let ta = self.token(Owner::Relay(rid));
        let tb = self.token(Owner::Relay(rid));
        let both = Interest::READABLE | Interest::WRITABLE;
        let reg = self.poll.registry();
        if let Err(e) = reg
            .register(relay.a_mut(), ta, both)
            .and_then(|()| reg.register(relay.b_mut(), tb, both))
        {
            error!("cannot register relay {label}: {e}");
            relay.abort();
            self.owners.remove(&ta);
            self.owners.remove(&tb);
            return;
        }
        self.counters.relays_started += 1;
        info!("relay started: {label}");
        self.relays.insert(
            rid,
            RelayEntry {
                relay,
                tokens: [ta, tb],
                label,
                connector,
                started: self.now().mono,
            },
        );
        self.pump_relay(rid);
    }

    pub(super) fn pump_relay(&mut self, rid: usize) {
        let now = self.now().mono;
        let Some(e) = self.relays.get_mut(&rid) else {
            return;
        };
        let state = e.relay.pump(now);
        if state == RelayState::Open {
            return;
        }
        self.finish_relay(rid, state);
    }

    /// Drops a relay that ended (`state` is not Open) and counts it.
    pub(super) fn finish_relay(&mut self, rid: usize, state: RelayState) {
        let Some(mut e) = self.relays.remove(&rid) else {
            return;
        };
        for t in e.tokens {
            self.owners.remove(&t);
        }
        let _ = self.poll.registry().deregister(e.relay.a_mut());
        let _ = self.poll.registry().deregister(e.relay.b_mut());
        let (ab, ba) = e.relay.bytes();
        self.counters.relay_bytes += ab + ba;
        match state {
            RelayState::Done => {
                self.counters.relays_done += 1;
                info!("relay closed: {} ({ab} + {ba} bytes)", e.label);
            }
            RelayState::Reset(why) => {
                self.counters.relays_reset += 1;
                info!("relay reset: {} ({ab} + {ba} bytes): {why}", e.label);
            }
            RelayState::Open => {}
        }
    }
}
