//! GCB UDP, sending: to a relayed sender as a `To` frame through the proxy, to a punched
//! peer straight to its NAT mapping as a `From` frame, to anyone else as is; and the
//! first datagram of a pending socket to the broker's host, which registers it.

use gcb_proto::udp::{self, UdpKind};
use gcb_proto::UDP_HEADER_LEN;
use libc::{c_int, c_void, iovec, msghdr, ssize_t};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Instant;

use super::core::GcbLayer;
use super::punch::send_keepalive;
use super::udp::framed_msghdr;
use super::udp::{is_pending, set_state, take_pending, view, with_state, UdpSock, UdpView};
use crate::abi::{IoCall, Outcome};
use crate::fdtable::FdEntry;
use crate::net::{self, errno};
use crate::sockaddr::SockAddrBuf;
use crate::sockstate::SockState;

/// Where a send call goes (None: the kernel-connected peer).
pub(super) fn send_dest(call: &IoCall) -> Option<SocketAddrV4> {
    match *call {
        IoCall::Send { to, .. } => net::addr_in(to),
        IoCall::SendMsg { msg, .. } if !msg.is_null() => {
            // SAFETY: the program's msghdr, valid for the call.
            let m = unsafe { &*msg };
            net::addr_in(crate::layer::AddrIn {
                ptr: m.msg_name as *const libc::sockaddr,
                len: m.msg_namelen,
            })
        }
        _ => None,
    }
}

/// Where a datagram the program sends on a registered socket goes.
pub(super) enum Plan {
    /// To a punched peer: a `From` frame carrying `me` straight to `direct`.
    Direct {
        dest: SocketAddrV4,
        direct: SocketAddrV4,
        me: SocketAddrV4,
    },
    /// To a relayed sender: a `To` frame through our proxy.
    Relay(SocketAddrV4, SocketAddrV4),
    /// To another registration's proxy: as is (the broker relays it), and ask for a
    /// punch (our proxy, the destination).
    Ask(SocketAddrV4, SocketAddrV4),
}

/// Sends the program's datagram (`prog_iov`, its msghdr's control data if any) from
/// `fd` to `to`, behind a `kind` header carrying `addr`; returns the program's bytes
/// sent, or errno.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_framed(
    fd: c_int,
    family: c_int,
    kind: UdpKind,
    addr: SocketAddrV4,
    to: SocketAddrV4,
    prog_iov: &[iovec],
    msg: *const msghdr,
    flags: c_int,
) -> Result<usize, c_int> {
    let hdr = udp::write_header(kind, addr);
    let mut iov = Vec::with_capacity(prog_iov.len() + 1);
    iov.push(iovec {
        iov_base: hdr.as_ptr() as *mut c_void,
        iov_len: hdr.len(),
    });
    iov.extend_from_slice(prog_iov);
    let mut name = SockAddrBuf::new(to, family);
    let mh = framed_msghdr(&mut name, &mut iov, msg);
    // SAFETY: mh describes buffers valid for the call (ours and the program's).
    let n = unsafe { libc::sendmsg(fd, &mh, flags | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(errno());
    }
    Ok((n as usize).saturating_sub(UDP_HEADER_LEN))
}

impl GcbLayer {
    /// send/sendto/sendmsg/write on a registered UDP socket: to a relayed sender, as a
    /// `To` frame through the proxy; to anyone else, as is.
    pub fn udp_send(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        // Other managed sockets (e.g. brokered TCP connections) pass straight through,
        // before anything is allocated.
        match view(entry) {
            UdpView::Registered(..) => {}
            UdpView::Registering if self.poll_registering(entry).is_some() => {}
            _ => return self.first_send_of_pending(fd, entry, call),
        }
        let (prog_iov, flags, to, msg): (Vec<iovec>, c_int, Option<SocketAddrV4>, *const msghdr) =
            match call {
                IoCall::Send {
                    buf,
                    len,
                    flags,
                    to,
                } => (
                    vec![iovec {
                        iov_base: buf as *mut c_void,
                        iov_len: len,
                    }],
                    flags,
                    net::addr_in(to),
                    std::ptr::null(),
                ),
                IoCall::SendMsg { msg, flags } => {
                    if msg.is_null() {
                        return Outcome::Bypass("null msghdr: the kernel reports the error");
                    }
                    // SAFETY: the program's msghdr, valid for the call.
                    let m = unsafe { &*msg };
                    let iov = if m.msg_iov.is_null() || m.msg_iovlen == 0 {
                        Vec::new()
                    } else {
                        // SAFETY: msg_iov holds msg_iovlen iovecs.
                        unsafe { std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen) }.to_vec()
                    };
                    let to = net::addr_in(crate::layer::AddrIn {
                        ptr: m.msg_name as *const libc::sockaddr,
                        len: m.msg_namelen,
                    });
                    (iov, flags, to, msg)
                }
                _ => return Outcome::Bypass("not a send call"),
            };
        let len: usize = prog_iov.iter().map(|v| v.iov_len).sum();
        let now = Instant::now();
        let plan = with_state(entry, |u| {
            let dest = to.or(u.peer)?;
            if u.peer.is_none() && len <= gcb_proto::MAX_UDP_PAYLOAD {
                if let Some((direct, me)) = u.punch.route(dest, now) {
                    return Some(Plan::Direct { dest, direct, me });
                }
            }
            if u.receivers.contains(&dest) {
                return Some(Plan::Relay(u.proxy, dest));
            }
            (u.peer.is_none()
                && *dest.ip() == u.broker
                && dest != u.proxy
                && u.punch.should_ask(dest, now))
            .then_some(Plan::Ask(u.proxy, dest))
        })
        .flatten();
        let (proxy, dest) = match plan {
            None => return Outcome::Bypass("destination not through the proxy"),
            Some(Plan::Ask(mine, dest)) => {
                // This datagram goes through the relay; the punch is set up meanwhile.
                self.client().lock().request_punch(mine, dest, entry);
                return Outcome::Bypass("relayed through the proxy while the punch is set up");
            }
            Some(Plan::Relay(proxy, dest)) => (proxy, dest),
            Some(Plan::Direct { dest, direct, me }) => {
                match send_framed(
                    fd,
                    entry.domain(),
                    UdpKind::From,
                    me,
                    direct,
                    &prog_iov,
                    msg,
                    flags,
                ) {
                    Ok(n) => return Outcome::Handled(n as ssize_t),
                    Err(e)
                        if matches!(
                            e,
                            libc::EAGAIN | libc::EINTR | libc::ENOBUFS | libc::EMSGSIZE
                        ) =>
                    {
                        return Outcome::Error(e)
                    }
                    Err(e) => {
                        // The direct path broke: relay from now on (and this datagram).
                        crate::debug!(
                            "punch: direct send to {} ({}) failed: errno {}; relay",
                            dest,
                            direct,
                            e
                        );
                        let relay = with_state(entry, |u| {
                            u.punch.on_send_error(dest, now);
                            u.receivers.contains(&dest).then_some(u.proxy)
                        })
                        .flatten();
                        match relay {
                            Some(proxy) => (proxy, dest),
                            None => return Outcome::Bypass("no relay for this destination"),
                        }
                    }
                }
            }
        };
        match send_framed(
            fd,
            entry.domain(),
            UdpKind::To,
            dest,
            proxy,
            &prog_iov,
            msg,
            flags,
        ) {
            Ok(n) => Outcome::Handled(n as ssize_t),
            Err(e) => Outcome::Error(e),
        }
    }

    /// A send on a managed but unregistered UDP socket. A [`SockState::UdpPending`] socket's first
    /// datagram to the broker's host (another registration's proxy) registers it, so the
    /// exchange can punch. The datagram goes first, as is (to that proxy, exactly what the
    /// registered path sends first), and the registration round trip runs while it is on
    /// its way; an answer that arrives meanwhile waits in the socket's queue.
    pub(super) fn first_send_of_pending(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        call: IoCall,
    ) -> Outcome<ssize_t> {
        let Some(dest) = send_dest(&call) else {
            return Outcome::Bypass("no destination address");
        };
        if !is_pending(entry) || dest.ip() != self.client().lock().broker.ip() {
            return Outcome::Bypass("not a pending socket sending to the broker's host");
        }
        let sent = match call {
            // SAFETY: the program's own arguments, under sendto's contract.
            IoCall::Send {
                buf,
                len,
                flags,
                to,
            } => unsafe { libc::sendto(fd, buf, len, flags, to.ptr, to.len) },
            // SAFETY: the program's own msghdr, under sendmsg's contract.
            IoCall::SendMsg { msg, flags } => unsafe { libc::sendmsg(fd, msg, flags) },
            _ => return Outcome::Bypass("not a send call"),
        };
        if sent < 0 {
            return Outcome::Error(errno());
        }
        if !take_pending(entry) {
            return Outcome::Handled(sent);
        }
        let Some(local) = self.registration_local(fd) else {
            return Outcome::Handled(sent);
        };
        let mut c = self.client().lock();
        match c.register_udp_start(local, entry, fd, dest) {
            // The marker is set under the client lock, before the AEH can see the answer.
            Ok(None) => set_state(entry, SockState::UdpRegistering),
            Ok(Some((proxy, token))) => {
                set_state(
                    entry,
                    SockState::UdpRegistered(UdpSock::new(proxy, *c.broker.ip())),
                );
                send_keepalive(fd, proxy, &token);
                if with_state(entry, |u| u.punch.should_ask(dest, Instant::now())) == Some(true) {
                    c.request_punch(proxy, dest, entry);
                }
            }
            Err(why) => crate::warn!("bind udp {}: {}; serving locally only", local, why),
        }
        Outcome::Handled(sent)
    }
}
