//! TCP hole punching on the broker's side (`gcb_proto::tcp_punch`): the connector's
//! leg arrives for a `Route::Punch` decision, a standby of the listener gets the claim
//! and the leg the offer, and the connector's verdict (`DIRECT` / `RELAY`) either ends
//! both connections or turns them into an ordinary relay.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Token};
use tracing::{debug, info, warn};

use crate::decision::canonical;
use gcb_proto::tcp_punch::{self, Kind, PunchMsg, DIRECT, RELAY};

use super::state::{
    drop_conn, hex, reset, would_block, Claim, Owner, PunchPair, Server, CLAIM_TIMEOUT,
};

/// How long the connector has to say `DIRECT` or `RELAY` after the offer (its own
/// punch deadline is a fraction of this).
pub(super) const PUNCH_VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// The connector's leg presented the id of a punch decision: claim a standby for the
    /// punch and send both sides the other's endpoint; without a standby, the leg is a
    /// plain relay (the listener's side comes by `connect_back`).
    pub(super) fn start_punch(&mut self, id: [u8; 16], mut leg: TcpStream, leg_peer: SocketAddr) {
        let Some(p) = self.pending.get_mut(&id) else {
            reset(leg);
            return;
        };
        p.punch = false; // the listener's side arrives as a plain relay leg from now on
        let proxy = p.proxy;
        let raw = p.raw;
        let listener = self
            .registry
            .get(gcb_proto::Transport::Tcp, &proxy)
            .map(|r| r.observed);
        let key = self.cfg.key.clone();
        let standby_key = self.standby.key_of(&proxy);
        // A standby leaves the pool only when everything else for the punch is there.
        let taken = match (&key, standby_key, listener, leg_peer) {
            (Some(_), Some(_), Some(_), SocketAddr::V4(_)) => self.standby.take(&proxy),
            _ => None,
        };
        let (
            Some(key),
            Some(standby_key),
            Some((stoken, parked)),
            Some(listener),
            SocketAddr::V4(leg_v4),
        ) = (key, standby_key, taken, listener, leg_peer)
        else {
            self.counters.punch_fallback += 1;
            self.counters.relay += 1;
            info!(
                "punch {}: no standby of proxy {proxy} to punch from; relaying",
                hex(&id)
            );
            self.punch_to_relay(id, raw, proxy, leg, leg_peer);
            return;
        };
        let SocketAddr::V4(standby_v4) = parked.peer else {
            self.counters.punch_fallback += 1;
            self.counters.relay += 1;
            let _ = self.poll.registry().deregister(&mut { parked.stream });
            self.owners.remove(&stoken);
            self.punch_to_relay(id, raw, proxy, leg, leg_peer);
            return;
        };
        let nonce = self.random16();
        let claim = tcp_punch::encode(
            &key,
            &PunchMsg {
                kind: Kind::Claim,
                peer: leg_v4,
                nonce,
            },
            &standby_key,
        );
        let offer = tcp_punch::encode(
            &key,
            &PunchMsg {
                kind: Kind::Offer,
                peer: standby_v4,
                nonce,
            },
            &id,
        );
        let mut standby = parked.stream;
        for s in [&standby, &leg] {
            let sock = socket2::SockRef::from(s);
            let _ = sock.set_nodelay(true);
        }
        // 44 bytes into idle connections' empty send buffers: all or nothing.
        let sent = matches!(standby.write(&claim), Ok(n) if n == claim.len())
            && matches!(leg.write(&offer), Ok(n) if n == offer.len());
        if !sent {
            warn!(
                "punch {}: could not write the claim and offer; closing both",
                hex(&id)
            );
            let _ = self.poll.registry().deregister(&mut standby);
            self.owners.remove(&stoken);
            reset(standby);
            reset(leg);
            if let Some(p) = self.pending.remove(&id) {
                drop_conn(p.waiting);
            }
            return;
        }
        self.owners.insert(stoken, Owner::Punch(id));
        let ltoken = self.token(Owner::Punch(id));
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut leg, ltoken, Interest::READABLE)
        {
            warn!("punch {}: register the leg: {e}", hex(&id));
            self.owners.remove(&ltoken);
            let _ = self.poll.registry().deregister(&mut standby);
            self.owners.remove(&stoken);
            reset(standby);
            reset(leg);
            self.pending.remove(&id);
            return;
        }
        debug!(
            "punch {}: connector {leg_peer} <-> listener standby {standby_v4} (proxy {proxy})",
            hex(&id)
        );
        self.punches.insert(
            id,
            PunchPair {
                leg,
                leg_peer,
                leg_token: ltoken,
                standby: Some((standby, stoken)),
                standby_peer: parked.peer,
                proxy,
                listener,
                deadline: self.now().mono + PUNCH_VERDICT_TIMEOUT,
            },
        );
    }

    /// No punch for this leg after all: tell the connector, and pair the leg as a relay
    /// (a standby claim, else a `connect_back`).
    fn punch_to_relay(
        &mut self,
        id: [u8; 16],
        raw: [u8; 16],
        proxy: SocketAddr,
        mut leg: TcpStream,
        leg_peer: SocketAddr,
    ) {
        let none = tcp_punch::encode_no_punch();
        if !matches!(leg.write(&none), Ok(n) if n == none.len()) {
            reset(leg);
            self.pending.remove(&id);
            return;
        }
        let listener = self
            .registry
            .get(gcb_proto::Transport::Tcp, &proxy)
            .map(|r| r.observed);
        let Some(listener) = listener else {
            reset(leg);
            self.pending.remove(&id);
            return;
        };
        if let Some(p) = self.pending.get_mut(&id) {
            p.waiting = Some((leg, leg_peer));
        }
        if !self.claim_standby(proxy, id, listener, leg_peer) {
            self.connect_back_for(id, raw, listener, proxy, leg_peer);
        }
    }

    /// Asks the listener at `listener` to dial the relay for the pairing `id`; if it cannot
    /// be asked, the pairing ends (its waiting connection is reset).
    fn connect_back_for(
        &mut self,
        id: [u8; 16],
        raw: [u8; 16],
        listener: SocketAddr,
        proxy: SocketAddr,
        peer: SocketAddr,
    ) {
        match self.send_connect_back(&listener, raw, proxy, peer) {
            Some(req) => {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.connect_back = Some(req);
                }
            }
            None => {
                if let Some(p) = self.pending.remove(&id) {
                    drop_conn(p.waiting);
                }
            }
        }
    }

    /// Either connection of the punch `id` is readable.
    pub(super) fn on_punch_event(&mut self, id: [u8; 16], tok: Token) {
        let Some(pair) = self.punches.get_mut(&id) else {
            return;
        };
        if tok == pair.leg_token {
            let mut b = [0u8; 1];
            let verdict = loop {
                // Exactly one byte: what follows a RELAY is the program's data.
                match pair.leg.read(&mut b) {
                    Ok(1) => break Some(Ok(b[0])),
                    Ok(_) => break Some(Err("closed".to_owned())),
                    Err(e) if would_block(&e) => break None,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(Err(e.to_string())),
                }
            };
            match verdict {
                None => {}
                Some(Ok(DIRECT)) => self.punch_direct(id),
                Some(Ok(RELAY)) => self.punch_fell_back(id),
                Some(Ok(other)) => self.punch_abort(id, &format!("connector sent {other:#04x}")),
                Some(Err(why)) => self.punch_abort(id, &format!("connector's leg {why}")),
            }
            return;
        }
        // The listener says nothing before the verdict: anything here is a close.
        let Some((stream, t)) = pair.standby.as_mut() else {
            return;
        };
        let mut b = [0u8; 16];
        let gone = loop {
            match stream.read(&mut b) {
                Ok(_) => break true,
                Err(e) if would_block(&e) => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        if gone {
            let t = *t;
            if let Some((mut s, _)) = pair.standby.take() {
                let _ = self.poll.registry().deregister(&mut s);
            }
            self.owners.remove(&t);
            debug!("punch {}: the listener's standby closed", hex(&id));
        }
    }

    /// Takes the punch `id` out of the table and the poller.
    fn take_punch(&mut self, id: [u8; 16]) -> Option<PunchPair> {
        let mut pair = self.punches.remove(&id)?;
        let _ = self.poll.registry().deregister(&mut pair.leg);
        self.owners.remove(&pair.leg_token);
        if let Some((s, t)) = pair.standby.as_mut() {
            let _ = self.poll.registry().deregister(s);
            self.owners.remove(t);
        }
        Some(pair)
    }

    /// The connector uses the punched connection: both broker connections end.
    fn punch_direct(&mut self, id: [u8; 16]) {
        let Some(pair) = self.take_punch(id) else {
            return;
        };
        self.pending.remove(&id);
        self.connector_of.remove(&id);
        self.counters.punched += 1;
        self.punch_memo.worked(
            canonical(pair.leg_peer.ip()),
            canonical(pair.standby_peer.ip()),
        );
        if let Some((mut s, _)) = pair.standby {
            let _ = s.write(&[DIRECT]);
        }
        info!(
            "connect {} -> proxy {}: punched (direct {} <-> {})",
            hex(&id),
            pair.proxy,
            pair.leg_peer,
            pair.standby_peer
        );
    }

    /// The punch did not connect in time: relay the two connections.
    fn punch_fell_back(&mut self, id: [u8; 16]) {
        let Some(pair) = self.take_punch(id) else {
            return;
        };
        self.counters.punch_fallback += 1;
        self.counters.relay += 1;
        let now = self.now().mono;
        self.punch_memo.failed(
            canonical(pair.leg_peer.ip()),
            canonical(pair.standby_peer.ip()),
            now,
        );
        info!(
            "connect {} -> proxy {}: punch {} <-> {} failed; relaying (this pair relays at once for {} s)",
            hex(&id),
            pair.proxy,
            pair.leg_peer,
            pair.standby_peer,
            crate::punchmemo::FAILED_FOR.as_secs()
        );
        let Some(raw) = self.pending.get(&id).map(|p| p.raw) else {
            reset(pair.leg);
            if let Some((s, _)) = pair.standby {
                reset(s);
            }
            return;
        };
        if let Some(p) = self.pending.get_mut(&id) {
            p.waiting = Some((pair.leg, pair.leg_peer));
            p.deadline = now + self.cfg.connect_timeout;
        }
        // The standby becomes the listener's relay leg once its shim acks, as for a
        // `GCB-GO` claim; without it (it closed), a connect_back.
        if let Some((mut s, tok)) = pair.standby {
            if matches!(s.write(&[RELAY]), Ok(1))
                && self
                    .poll
                    .registry()
                    .register(&mut s, tok, Interest::READABLE)
                    .is_ok()
            {
                self.owners.insert(tok, Owner::Claim);
                self.claims.insert(
                    tok,
                    Claim {
                        stream: s,
                        peer: pair.standby_peer,
                        id,
                        proxy: pair.proxy,
                        listener: pair.listener,
                        logical_peer: pair.leg_peer,
                        deadline: now + CLAIM_TIMEOUT,
                    },
                );
                return;
            }
        }
        self.connect_back_for(id, raw, pair.listener, pair.proxy, pair.leg_peer);
    }

    /// A punch ended without a verdict (junk, a close, the deadline): reset both.
    pub(super) fn punch_abort(&mut self, id: [u8; 16], why: &str) {
        let Some(pair) = self.take_punch(id) else {
            return;
        };
        self.pending.remove(&id);
        self.connector_of.remove(&id);
        warn!(
            "punch {} for proxy {} ({} <-> {}): {why}; closed",
            hex(&id),
            pair.proxy,
            pair.leg_peer,
            pair.standby_peer
        );
        reset(pair.leg);
        if let Some((s, _)) = pair.standby {
            reset(s);
        }
    }
}
