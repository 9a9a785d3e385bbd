//! GCB UDP, receiving: the interposed recv/recvfrom/recvmsg/read on a registered socket
//! read with one extra 11-byte iovec in front of the program's buffers, so a relay
//! frame's header lands there and its payload exactly in the program's buffers; frames of
//! the shim's never reach the program, ordinary datagrams are shifted back into place.
//! Also the readiness check select/poll/epoll use to hide the shim's own datagrams.

use gcb_proto::punch::Verdict;
use gcb_proto::udp::{self, UdpKind};
use gcb_proto::UDP_HEADER_LEN;
use libc::{c_int, c_void, iovec, msghdr, ssize_t};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use super::core::GcbLayer;
use super::udp::{framed_msghdr, gather};
use super::udp::{state, view, with_state, UdpView};
use crate::abi::{AddrOut, IoCall, Outcome};
use crate::fdtable::FdEntry;
use crate::net::{self, errno};
use crate::sockaddr::{self, SockAddrBuf};

/// Most senders a socket remembers for replies (a new one beyond it replaces the list).
pub(super) const MAX_RECEIVERS: usize = 4096;

/// What a receive call gives the shim: the program's buffers and its result slots.
struct RecvArgs {
    prog_iov: Vec<iovec>,
    flags: c_int,
    /// recvmsg's msghdr (null for recv/recvfrom/read).
    msg: *mut msghdr,
    /// recvfrom's address buffer (null for the others).
    from: AddrOut,
}

impl RecvArgs {
    /// The receive call's arguments, or why the shim leaves the call to the kernel.
    fn of(call: IoCall) -> Result<RecvArgs, &'static str> {
        Ok(match call {
            IoCall::Recv {
                buf,
                len,
                flags,
                from,
            } => RecvArgs {
                prog_iov: vec![iovec {
                    iov_base: buf,
                    iov_len: len,
                }],
                flags,
                msg: std::ptr::null_mut(),
                from,
            },
            IoCall::RecvMsg { msg, flags } => {
                if msg.is_null() {
                    return Err("null msghdr: the kernel reports the error");
                }
                // SAFETY: the program's msghdr, valid for the call (recvmsg's contract).
                let m = unsafe { &*msg };
                let prog_iov = if m.msg_iov.is_null() || m.msg_iovlen == 0 {
                    Vec::new()
                } else {
                    // SAFETY: msg_iov holds msg_iovlen iovecs (recvmsg's contract).
                    unsafe { std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen) }.to_vec()
                };
                RecvArgs {
                    prog_iov,
                    flags,
                    msg,
                    from: AddrOut {
                        ptr: std::ptr::null_mut(),
                        len: std::ptr::null_mut(),
                    },
                }
            }
            _ => return Err("not a receive call"),
        })
    }
}

/// What a receive call returns for a datagram of `len` bytes into `cap` bytes of buffers:
/// the real length with MSG_TRUNC (as the kernel does), else what was delivered.
fn returned_len(len: usize, cap: usize, flags: c_int) -> usize {
    if flags & libc::MSG_TRUNC != 0 {
        len
    } else {
        len.min(cap)
    }
}

impl GcbLayer {
    /// recv/recvfrom/recvmsg/read on a registered UDP socket.
    pub fn udp_recv(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        let (proxy, vpeer) = match view(entry) {
            UdpView::Registered(p, v) => (p, v),
            UdpView::Registering => match self.poll_registering(entry) {
                Some(pv) => pv,
                None => return Outcome::Bypass("registration not answered: plain socket"),
            },
            UdpView::Other => return Outcome::Bypass("not a registered UDP socket"),
        };
        let RecvArgs {
            prog_iov,
            flags,
            msg,
            from,
        } = match RecvArgs::of(call) {
            Ok(r) => r,
            Err(why) => return Outcome::Bypass(why),
        };
        if flags & libc::MSG_ERRQUEUE != 0 {
            return Outcome::Bypass("MSG_ERRQUEUE: kernel error queue, no relay framing");
        }
        let cap: usize = prog_iov.iter().map(|v| v.iov_len).sum();
        // Senders are reported in the form the program's socket family takes.
        let family = entry.domain();
        let peek = flags & libc::MSG_PEEK != 0;
        let blocking = flags & libc::MSG_DONTWAIT == 0 && !net::is_nonblocking(fd);
        let deadline = blocking
            .then(|| net::rcv_timeout(fd))
            .flatten()
            .and_then(|t| Instant::now().checked_add(t));
        loop {
            if blocking {
                match self.wait_readable(fd, deadline) {
                    Ok(true) => {}
                    Ok(false) if deadline.is_some_and(|d| Instant::now() >= d) => {
                        return Outcome::Error(libc::EAGAIN);
                    }
                    Ok(false) => continue,
                    Err(e) => return Outcome::Error(e),
                }
            }
            let mut hdr = [0u8; UDP_HEADER_LEN];
            let mut iov = Vec::with_capacity(prog_iov.len() + 1);
            iov.push(iovec {
                iov_base: hdr.as_mut_ptr() as *mut c_void,
                iov_len: hdr.len(),
            });
            iov.extend_from_slice(&prog_iov);
            // Room for either family's sender (a dual-stack socket hears `::ffff:` ones).
            let mut name = SockAddrBuf::empty();
            let mut mh = framed_msghdr(&mut name, &mut iov, msg);
            // MSG_TRUNC: the kernel returns the datagram's real length.
            let real_flags = (flags | libc::MSG_DONTWAIT | libc::MSG_TRUNC) & !libc::MSG_WAITALL;
            // SAFETY: mh describes buffers valid for the call: ours and the program's.
            let n = unsafe { libc::recvmsg(fd, &mut mh, real_flags) };
            if n < 0 {
                let e = errno();
                if (e == libc::EAGAIN || e == libc::EINTR) && blocking {
                    if e == libc::EINTR {
                        return Outcome::Error(e);
                    }
                    continue;
                }
                return Outcome::Error(e);
            }
            *name.len_mut() = mh.msg_namelen;
            let total = n as usize;
            let got = total.min(UDP_HEADER_LEN + cap);
            let src = name.v4();
            let frame = (src == Some(proxy) && got >= UDP_HEADER_LEN)
                .then(|| udp::parse(&hdr))
                .flatten();
            if src == Some(proxy) {
                match frame {
                    Some((UdpKind::From, sender, _)) => {
                        if vpeer.is_some_and(|p| p != sender) {
                            // A virtually connected socket hears only its peer.
                            discard_peeked(fd, peek);
                            self.count_stray();
                            continue;
                        }
                        let relayed = with_state(entry, |u| {
                            if u.receivers.len() >= MAX_RECEIVERS && !u.receivers.contains(&sender)
                            {
                                u.receivers.clear();
                            }
                            u.receivers.insert(sender);
                            // A direct peer that uses the relay lost its side of the punch
                            // (e.g. another program on its address): answer via the relay.
                            !u.punch.is_empty() && u.punch.on_relayed(sender, Instant::now())
                        });
                        if relayed == Some(true) {
                            crate::debug!("punch {}: heard through the relay: relay", sender);
                        }
                        let payload = total - UDP_HEADER_LEN;
                        let sender = SockAddrBuf::new(sender, family);
                        return self.deliver(&sender, payload, cap, flags, from, msg, &mh);
                    }
                    _ => {
                        discard_peeked(fd, peek);
                        self.count_stray();
                        continue;
                    }
                }
            }
            if let (Some(s), Some((kind, addr, _))) = (src, frame_hdr(&hdr, got)) {
                // Not from our proxy: a punched peer's frame (see `punch`), or forged.
                let nonce = match kind {
                    UdpKind::Dummy | UdpKind::DummyAck => gather(&prog_iov, got - UDP_HEADER_LEN),
                    _ => Vec::new(),
                };
                let now = Instant::now();
                let verdict = with_state(entry, |u| u.punch.on_frame(s, kind, addr, &nonce, now))
                    .unwrap_or(Verdict::Forged);
                match verdict {
                    Verdict::Deliver(sender) if vpeer.is_none_or(|p| p == sender) => {
                        let payload = total - UDP_HEADER_LEN;
                        let sender = SockAddrBuf::new(sender, family);
                        return self.deliver(&sender, payload, cap, flags, from, msg, &mh);
                    }
                    v => {
                        self.consume_punch_frame(fd, peek, s, v);
                        continue;
                    }
                }
            }
            if vpeer.is_some() {
                // A virtually connected socket hears only its peer (via the proxy).
                discard_peeked(fd, peek);
                continue;
            }
            // An ordinary datagram: put its first bytes back in front.
            unshift(
                &prog_iov,
                &hdr[..got.min(UDP_HEADER_LEN)],
                got.saturating_sub(UDP_HEADER_LEN),
            );
            let Some(s) = src else {
                // Not IPv4 (a native IPv6 peer of a dual-stack socket): as the kernel said.
                return self.deliver(&name, total, cap, flags, from, msg, &mh);
            };
            // A punched destination answering through its proxy has lost its side.
            let relayed = with_state(entry, |u| {
                !u.punch.is_empty() && u.punch.on_relayed(s, Instant::now())
            });
            if relayed == Some(true) {
                crate::debug!("punch {}: heard through the relay: relay", s);
            }
            return self.deliver(&name, total, cap, flags, from, msg, &mh);
        }
    }

    /// Completes a receive of a `len`-byte datagram from `sender` (in the form the program's
    /// socket family takes) whose payload is in the program's buffers: the sender into
    /// recvfrom's/recvmsg's address, recvmsg's flags.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        sender: &SockAddrBuf,
        len: usize,
        cap: usize,
        flags: c_int,
        from: AddrOut,
        msg: *mut msghdr,
        mh: &msghdr,
    ) -> Outcome<ssize_t> {
        sockaddr::copy_out(from, sender);
        self.finish_msg(msg, sender, len > cap, mh);
        Outcome::Handled(returned_len(len, cap, flags) as ssize_t)
    }

    /// For recvmsg: the program's msg_name (the logical sender), msg_flags, controllen.
    pub(super) fn finish_msg(
        &self,
        msg: *mut msghdr,
        sender: &SockAddrBuf,
        truncated: bool,
        mh: &msghdr,
    ) {
        if msg.is_null() {
            return;
        }
        // SAFETY: the program's msghdr, valid and writable for recvmsg.
        let m = unsafe { &mut *msg };
        if !m.msg_name.is_null() {
            let mut len = m.msg_namelen;
            sockaddr::copy_out(
                AddrOut {
                    ptr: m.msg_name as *mut libc::sockaddr,
                    len: &mut len,
                },
                sender,
            );
            m.msg_namelen = len;
        }
        m.msg_controllen = mh.msg_controllen;
        m.msg_flags =
            (mh.msg_flags & !libc::MSG_TRUNC) | if truncated { libc::MSG_TRUNC } else { 0 };
    }

    /// Before a wait tells the program that registered UDP socket `fd` is readable: take
    /// the shim's own datagrams (punch Dummies and acks, strays) off the head of its queue
    /// and act on them, as the recv path would. True if a datagram for the program is
    /// queued. Without this, a peer's Dummy made select()/poll() report the socket ready and
    /// the program's following blocking recv() waited for real data that might never come.
    pub fn udp_has_program_data(&self, fd: c_int) -> bool {
        let Some(entry) = crate::fdtable::get(fd) else {
            return true;
        };
        let Some((proxy, _)) = state(&entry) else {
            return true;
        };
        loop {
            // Header plus the start of the payload (a Dummy's nonce).
            let mut buf = [0u8; UDP_HEADER_LEN + 64];
            let mut name = SockAddrBuf::empty();
            let name_ptr = name.as_mut_ptr();
            // SAFETY: buf and name (with its length) are valid for the call; MSG_PEEK leaves
            // the queue as it is.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr() as *mut c_void,
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    name_ptr,
                    name.len_mut(),
                )
            };
            if n < 0 {
                // EAGAIN: nothing queued (an error is the recv call's to report).
                return crate::sys::errno() != libc::EAGAIN;
            }
            let got = n as usize;
            let Some(src) = name.v4() else {
                return true;
            };
            let mut hdr = [0u8; UDP_HEADER_LEN];
            hdr.copy_from_slice(&buf[..UDP_HEADER_LEN]);
            let Some((kind, addr, _)) = frame_hdr(&hdr, got) else {
                return true; // an ordinary datagram: the program's
            };
            if src == proxy {
                if kind == UdpKind::From {
                    return true;
                }
            } else {
                let payload = &buf[UDP_HEADER_LEN..got.min(buf.len())];
                let nonce = match kind {
                    UdpKind::Dummy | UdpKind::DummyAck => payload.to_vec(),
                    _ => Vec::new(),
                };
                // A From frame from a verified peer is the program's: classify without
                // consuming anything else (on_frame only updates the record's timers).
                let verdict = with_state(&entry, |u| {
                    u.punch.on_frame(src, kind, addr, &nonce, Instant::now())
                })
                .unwrap_or(Verdict::Forged);
                match verdict {
                    Verdict::Deliver(_) => return true,
                    v => {
                        self.consume_punch_frame(fd, true, src, v);
                        continue;
                    }
                }
            }
            discard_peeked(fd, true);
            self.count_stray();
        }
    }

    /// A peeked punch-path frame from `src` that is not the program's: take it off the
    /// queue and act on `verdict` (answer a Dummy, note an ack; anything else, e.g. a
    /// relay frame not from our proxy or a verified peer, is forged: dropped and counted).
    pub(super) fn consume_punch_frame(
        &self,
        fd: c_int,
        peek: bool,
        src: SocketAddrV4,
        verdict: Verdict,
    ) {
        discard_peeked(fd, peek);
        match verdict {
            Verdict::Ack(to, n) => super::punch::send_frame(
                fd,
                to,
                UdpKind::DummyAck,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                &n,
            ),
            Verdict::Consumed => crate::debug!("punch: DummyAck from {}: direct", src),
            _ => self.count_stray(),
        }
    }

    pub(super) fn count_stray(&self) {
        let n = self.client().lock().count_udp_stray();
        if n.is_power_of_two() {
            crate::info!("dropped {} stray datagram(s) on GCB UDP sockets", n);
        }
    }

    /// Block until `fd` is readable, running the AEH meanwhile (heartbeats, keepalive
    /// Dummies, broker commands). Ok(false): woke for the AEH only.
    /// Wait until `fd` is readable (true), the AEH ran, or `deadline` passed (false).
    pub(super) fn wait_readable(
        &self,
        fd: c_int,
        deadline: Option<Instant>,
    ) -> Result<bool, c_int> {
        // The AEH runs only when its sockets have something or a timer is due, so a
        // datagram ping-pong costs one poll and one recvmsg per datagram.
        let (ours, wake) = self.aeh().unwrap_or_default();
        let mut set = vec![libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        set.extend(ours.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let until = match (wake, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ms = until.map_or(-1, |w| {
            net::ms_ceil(w.saturating_duration_since(Instant::now()))
        });
        // SAFETY: set is a valid pollfd array of its length.
        let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, ms) };
        if r < 0 {
            return Err(errno());
        }
        let timer_due = wake.is_some_and(|w| Instant::now() >= w);
        if timer_due || set[1..].iter().any(|p| p.revents != 0) {
            self.pump();
        }
        Ok(set[0].revents != 0)
    }
}

/// After a MSG_PEEK that showed a datagram the program must not see: consume it.
pub(super) fn discard_peeked(fd: c_int, peek: bool) {
    if peek {
        let mut b = [0u8; 1];
        // SAFETY: b is writable; this discards the peeked datagram.
        unsafe { libc::recv(fd, b.as_mut_ptr() as *mut c_void, 1, libc::MSG_DONTWAIT) };
    }
}

/// The program's buffers got a datagram's bytes from offset 11 on; the first (up to 11)
/// bytes are in `head`. Shift the program's `tail_len` bytes right and put `head` in front,
/// within the buffers' capacity (bytes that no longer fit were beyond it anyway).
pub(super) fn unshift(iov: &[iovec], head: &[u8], tail_len: usize) {
    let cap: usize = iov.iter().map(|v| v.iov_len).sum();
    let keep = tail_len.min(cap.saturating_sub(head.len()));
    if iov.len() == 1 {
        let base = iov[0].iov_base as *mut u8;
        // SAFETY: the program's buffer holds cap bytes; tail_len <= cap were written by the
        // kernel; keep + head.len() <= cap. ptr::copy handles the overlap.
        unsafe {
            std::ptr::copy(base, base.add(head.len()), keep);
            std::ptr::copy_nonoverlapping(head.as_ptr(), base, head.len().min(cap));
        }
        return;
    }
    // Several buffers: gather, then scatter back.
    let mut linear = Vec::with_capacity(head.len() + keep);
    linear.extend_from_slice(head);
    let mut left = keep;
    for v in iov {
        if left == 0 {
            break;
        }
        let take = v.iov_len.min(left);
        // SAFETY: the kernel wrote these bytes into the program's buffer.
        linear.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, take)
        });
        left -= take;
    }
    let mut off = 0;
    for v in iov {
        if off >= linear.len() {
            break;
        }
        let take = v.iov_len.min(linear.len() - off);
        // SAFETY: writing within the program's buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(linear[off..].as_ptr(), v.iov_base as *mut u8, take)
        };
        off += take;
    }
}

/// The GCBU header of a received datagram of `got` bytes (header included), if it has one.
pub(super) fn frame_hdr(
    hdr: &[u8; UDP_HEADER_LEN],
    got: usize,
) -> Option<(UdpKind, SocketAddrV4, &[u8])> {
    (got >= UDP_HEADER_LEN).then(|| udp::parse(hdr)).flatten()
}
