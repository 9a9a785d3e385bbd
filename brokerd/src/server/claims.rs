//! Standby connections on the I/O side ([`crate::standby`] keeps the pure pool):
//! parking one, noticing it close, claiming it for a proxy connection (`GCB-GO`), its
//! ack, and the fall-back to `connect_back` when the ack does not come.

use std::io::{self, Read};
use std::net::SocketAddr;

use gcb_proto::Transport;
use mio::net::TcpStream;
use mio::Token;
use tracing::{debug, warn};

use crate::decision::canonical;
use crate::standby::ParkError;
use gcb_proto::preamble;

use super::state::{drop_conn, hex, reset, would_block, Claim, Owner, Server, CLAIM_TIMEOUT};

impl Server {
    /// A relay-port connection presented a standby key: park it for its proxy.
    pub(super) fn on_standby(&mut self, key: [u8; 16], mut stream: TcpStream, peer: SocketAddr) {
        // A standby key is valid only from its registration's observed IP: one read off
        // the wire and replayed from elsewhere would get that proxy's next client.
        let owner_ip = self
            .standby
            .proxy_of(&key)
            .and_then(|p| self.registry.get(Transport::Tcp, &p))
            .map(|r| canonical(r.observed.ip()));
        if owner_ip.is_some_and(|ip| ip != canonical(peer.ip())) {
            self.counters.standby_refused += 1;
            self.counters.foreign_presentations += 1;
            warn!(
                "standby from {peer} refused: its key belongs to a registration at another address"
            );
            reset(stream);
            return;
        }
        let tok = match self.watch_readable(&mut stream, Owner::Standby) {
            Ok(t) => t,
            Err(e) => {
                warn!("register standby from {peer}: {e}");
                return;
            }
        };
        match self.standby.park(&key, tok, stream, peer) {
            Ok(proxy) => {
                self.counters.standby_parked += 1;
                debug!("standby from {peer} parked for proxy {proxy}");
            }
            Err((why, mut stream)) => {
                self.counters.standby_refused += 1;
                let _ = self.poll.registry().deregister(&mut stream);
                self.owners.remove(&tok);
                match why {
                    ParkError::UnknownKey => {
                        debug!("standby from {peer} refused: {why}")
                    }
                    ParkError::Full => warn!("standby from {peer} refused: {why}"),
                }
                // A plain close: the shim re-dials after a back-off (after a broker
                // restart it registers again first and gets a new key).
                drop(stream);
            }
        }
    }

    /// A parked standby became readable: it closed, or sent bytes it must not send.
    pub(super) fn on_standby_event(&mut self, tok: Token) {
        let Some(p) = self.standby.remove(&tok) else {
            return;
        };
        let mut stream = p.stream;
        let mut buf = [0u8; 64];
        let keep = loop {
            match stream.read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => {
                    warn!("standby from {} sent data before a claim; closed", p.peer);
                    break false;
                }
                Err(e) if would_block(&e) => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if keep {
            // Spurious wake-up: park it again.
            if let Some(k) = self.standby.key_of(&p.proxy) {
                match self.standby.park(&k, tok, stream, p.peer) {
                    Ok(_) => return,
                    Err((_, s)) => stream = s,
                }
            }
        }
        debug!("standby from {} for proxy {} closed", p.peer, p.proxy);
        let _ = self.poll.registry().deregister(&mut stream);
        self.owners.remove(&tok);
    }

    /// Hands the pairing `id` (for `proxy`, seen by the program as `logical_peer`) to a
    /// standby of the proxy, if one takes the claim. False: none could; use connect_back.
    pub(super) fn claim_standby(
        &mut self,
        proxy: SocketAddr,
        id: [u8; 16],
        listener: SocketAddr,
        logical_peer: SocketAddr,
    ) -> bool {
        use std::io::Write;
        let SocketAddr::V4(logical_v4) = logical_peer else {
            return false;
        };
        let go = preamble::encode_go(logical_v4);
        while let Some((tok, p)) = self.standby.take(&proxy) {
            let mut stream = p.stream;
            // Acknowledge the shim's ack byte at once: a program without TCP_NODELAY
            // writes its first bytes right behind it, and Nagle holds them until then.
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_quickack(true);
            let _ = sock.set_nodelay(true);
            // 12 bytes into an idle connection's empty send buffer: all or nothing.
            match stream.write(&go) {
                Ok(n) if n == go.len() => {
                    self.owners.insert(tok, Owner::Claim);
                    self.claims.insert(
                        tok,
                        Claim {
                            stream,
                            peer: p.peer,
                            id,
                            proxy,
                            listener,
                            logical_peer,
                            deadline: self.now().mono + CLAIM_TIMEOUT,
                        },
                    );
                    debug!(
                        "connect id {} for proxy {proxy}: claimed standby from {}",
                        hex(&id),
                        p.peer
                    );
                    return true;
                }
                _ => {
                    let _ = self.poll.registry().deregister(&mut stream);
                    self.owners.remove(&tok);
                    reset(stream);
                }
            }
        }
        false
    }

    /// A claimed standby became readable: the shim's ack (then pair), or a failure.
    pub(super) fn on_claim_event(&mut self, tok: Token) {
        let Some(c) = self.claims.get_mut(&tok) else {
            return;
        };
        let mut b = [0u8; 1];
        let acked = loop {
            match c.stream.read(&mut b) {
                Ok(1) if b[0] == preamble::CLAIM_ACK => break Some(true),
                Ok(_) => break Some(false),
                Err(e) if would_block(&e) => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Some(false),
            }
        };
        match acked {
            None => {}
            Some(true) => {
                let Some(mut c) = self.claims.remove(&tok) else {
                    return;
                };
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.owners.remove(&tok);
                self.counters.standby_claimed += 1;
                self.on_arrival(c.id, c.stream, c.peer);
            }
            Some(false) => self.claim_failed(tok, "closed or answered junk"),
        }
    }

    /// A claim failed or timed out: close the standby and fall back to connect_back.
    pub(super) fn claim_failed(&mut self, tok: Token, why: &str) {
        let Some(mut c) = self.claims.remove(&tok) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.owners.remove(&tok);
        reset(c.stream);
        self.counters.standby_fallbacks += 1;
        warn!(
            "standby from {} for proxy {} {why}; falling back to connect_back",
            c.peer, c.proxy
        );
        let Some(raw) = self.pending.get(&c.id).map(|p| p.raw) else {
            return;
        };
        match self.send_connect_back(&c.listener, raw, c.proxy, c.logical_peer) {
            Some(req) => {
                let deadline = self.now().mono + self.cfg.connect_timeout;
                if let Some(p) = self.pending.get_mut(&c.id) {
                    p.connect_back = Some(req);
                    p.deadline = deadline;
                }
            }
            None => {
                if let Some(p) = self.pending.remove(&c.id) {
                    drop_conn(p.waiting);
                }
            }
        }
    }
}
