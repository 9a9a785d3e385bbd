//! GCB <-> GCB UDP hole punching in the shim (paper 4.2.1; the protocol, the records and
//! their timers are [`gcb_proto::punch`], this is the IO around them).
//!
//! * A registered UDP socket whose program sends to an address on the broker (another
//!   registration's UDP proxy) sends that datagram through the relay as before and asks
//!   the broker in the background (`punch_request` on the registration channel, see
//!   [`super::client::Client::request_punch`]); the broker's `punch` answer and its
//!   `punch_back` to the destination's shim each start a record in the socket's
//!   [`gcb_proto::punch::PunchTable`] (kept in its [`super::udp::UdpSock`], i.e. per socket and per
//!   process).
//! * The AEH ([`tick`], from [`super::client::Client::pump`]) sends the records' due
//!   `Dummy` frames from the program's own socket; the interposed receive calls consume
//!   the peer's `Dummy`/`DummyAck`/direct `From` frames ([`super::udp`]) and answer
//!   Dummies ([`send_frame`]). Nothing of this reaches the program: a direct datagram is
//!   delivered with the address the program would see through the relay.
//! * A record lives until it is idle for [`gcb_proto::punch::IDLE`] (a failed check, or
//!   the peer heard through the relay, only sends it back to the relay), or until the
//!   broker's `punch_end` says the peer's registration is gone (its program closed the socket, or its lease expired):
//!   [`on_punch_end`] drops it from every socket of our registration at once, so a
//!   program that takes the peer's address next does not get our frames as data.
//! * Limits: only unconnected sockets punch (a `connect()`ed socket's kernel filter
//!   would drop the peer's frames); a program whose receive buffer is shorter than a
//!   nonce (32 bytes) never verifies a punch and stays on the relay. A peer's Dummy does
//!   not make the program's socket readable: select/poll ([`super::udp`]) and epoll
//!   ([`super::udp_epoll`]) handle such frames and hide the readiness they alone caused.

use gcb_proto::punch::RETRY_AFTER;
use gcb_proto::udp::{self, UdpKind};
use gcb_proto::{Body, ErrorCode, UDP_HEADER_LEN};
use libc::{c_int, c_void};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How soon to ask again after a `busy` punch refusal.
const BUSY_RETRY: Duration = Duration::from_millis(250);

use crate::fdtable::{self, FdEntry};
use crate::net;
use crate::sockstate::UdpSock;

/// Runs `f` on the socket's punch state, if it is a GCB UDP socket.
pub fn with_sock<R>(entry: &FdEntry, f: impl FnOnce(&mut UdpSock) -> R) -> Option<R> {
    entry.with_state(|s| s.udp_mut().map(f)).flatten()
}

/// Send a keepalive with `token` from the program's socket `fd` to `proxy`.
pub fn send_keepalive(fd: c_int, proxy: SocketAddrV4, token: &[u8]) {
    send_frame(
        fd,
        proxy,
        UdpKind::KeepAlive,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        token,
    );
}

/// Sends one frame (`kind`, header address `addr`, `payload`) from the program's socket
/// `fd` to `to`, never blocking. Errors are only logged (the timers retry).
pub fn send_frame(fd: c_int, to: SocketAddrV4, kind: UdpKind, addr: SocketAddrV4, payload: &[u8]) {
    let mut buf = [0u8; UDP_HEADER_LEN + 64];
    let Some(n) = udp::write_frame(&mut buf, kind, addr, payload) else {
        return;
    };
    // In the form the program socket's family takes (a dual-stack socket sends to
    // `::ffff:to`).
    let name = crate::sockaddr::SockAddrBuf::new(to, net::domain(fd));
    // SAFETY: buf[..n] and name are valid for the call; fd is the program's UDP socket.
    let r = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr() as *const c_void,
            n,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            name.as_ptr(),
            name.len(),
        )
    };
    if r < 0 {
        crate::debug!(
            "{:?} frame to {} failed: {}",
            kind,
            to,
            crate::net::errstr(crate::sys::errno())
        );
    }
}

fn unspecified() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
}

/// The AEH's punch timers for one socket: sends its due Dummies; returns when it must
/// run again.
pub fn tick(entry: &Arc<FdEntry>, now: Instant) -> Option<Instant> {
    let mut due = Vec::new();
    let next = with_sock(entry, |u| {
        if u.punch.is_empty() {
            return None;
        }
        u.punch.poll(now, &mut due);
        u.punch.next_due()
    })
    .flatten();
    if !due.is_empty() {
        if let Some(&fd) = fdtable::fds_of(entry).first() {
            for (to, nonce) in due {
                crate::debug!("punch: Dummy to {}", to);
                send_frame(fd, to, UdpKind::Dummy, unspecified(), &nonce);
            }
        }
    }
    next
}

/// When the socket's punch timers are due next.
pub fn next_due(entry: &FdEntry) -> Option<Instant> {
    with_sock(entry, |u| u.punch.next_due()).flatten()
}

/// The broker's answer to our `punch_request` for `dest` (None: no answer).
pub fn on_answer(entry: &Arc<FdEntry>, dest: SocketAddrV4, body: Option<Body>) {
    let now = Instant::now();
    let r = with_sock(entry, |u| match body {
        Some(Body::Punch {
            peer,
            peer_local,
            me,
            nonce,
        }) => {
            let mut targets = vec![peer];
            targets.extend(peer_local);
            if u.punch.add(dest, me, nonce.as_bytes(), &targets, now) {
                format!("punching to {dest} via {targets:?} as {me}")
            } else {
                u.punch.refused(dest, now, RETRY_AFTER);
                "bad punch answer (or too many peers)".to_owned()
            }
        }
        other => {
            // `busy` (the broker has no data address for one side yet: its first keepalive
            // is still on the way) is worth asking again soon; anything else is not.
            let busy = matches!(&other, Some(Body::Error { code, .. }) if *code == ErrorCode::Busy);
            u.punch
                .refused(dest, now, if busy { BUSY_RETRY } else { RETRY_AFTER });
            match other {
                Some(Body::Error { code, reason }) => format!("refused: {code}: {reason}"),
                Some(b) => format!("unexpected answer {}", b.type_name()),
                None => "no answer".to_owned(),
            }
        }
    });
    if let Some(what) = r {
        crate::debug!("punch {}: {}", dest, what);
        tick(entry, now);
    }
}

/// The broker's `punch_back`: the registrant at data address `peer` (also the address
/// our program sees it at) is punching toward our socket `entry`.
pub fn on_punch_back(
    entry: &Arc<FdEntry>,
    peer: SocketAddrV4,
    peer_local: Option<SocketAddrV4>,
    nonce: &str,
) -> Body {
    let logical_peer = peer;
    let now = Instant::now();
    let r = with_sock(entry, |u| {
        if u.peer.is_some() {
            return Err("the socket is connected");
        }
        let mut targets = vec![peer];
        targets.extend(peer_local);
        if u.punch
            .add(logical_peer, u.proxy, nonce.as_bytes(), &targets, now)
        {
            Ok(())
        } else {
            Err("bad nonce or too many peers")
        }
    });
    match r {
        Some(Ok(())) => {
            crate::debug!("punch_back: punching to {} ({:?})", logical_peer, peer);
            tick(entry, now);
            Body::Ack {}
        }
        Some(Err(why)) => Body::error(gcb_proto::ErrorCode::BadRequest, why),
        None => Body::error(
            gcb_proto::ErrorCode::NoSuchRegistration,
            "not a GCB UDP socket",
        ),
    }
}

/// The broker's `punch_end`: the registration our socket `entry` punched with, known by
/// one of the `gone` addresses, has ended; its address may go to another program, which
/// would take our direct frames for data. Drops the record: datagrams to that address
/// go through the relay again.
pub fn on_punch_end(entry: &FdEntry, gone: &[SocketAddrV4]) {
    let removed: Vec<SocketAddrV4> = with_sock(entry, |u| {
        gone.iter().copied().filter(|a| u.punch.remove(a)).collect()
    })
    .unwrap_or_default();
    crate::debug!("punch_end: {:?} gone: removed {:?}", gone, removed);
}
