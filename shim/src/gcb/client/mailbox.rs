//! The family's mailbox of brokered connections.
//!
//! A brokered connection is dialed by whichever family member read the `connect_back`,
//! but any member may accept the placeholder. So the dialer posts the connection's fd
//! into the family's mailbox (an inherited `AF_UNIX` datagram socketpair, `SCM_RIGHTS`)
//! keyed by the placeholder's source port *before* the placeholder connects, then closes
//! its copies (see [`super::placeholder`]). The accepting process takes the fd out of
//! the mailbox; messages for other keys are posted back. Unaccepted entries expire.

use libc::c_int;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{drop_owned, now};
use crate::fdtable::{self, ShimFd};
use crate::net;

/// A brokered connection nobody accepts is dropped after this.
const READY_TTL_SECS: u64 = 60;
pub(super) const READY_TTL: Duration = Duration::from_secs(READY_TTL_SECS);

/// The family's mailbox of brokered connections: an inherited datagram socketpair.
pub(super) struct Mailbox {
    pub(super) tx: Arc<ShimFd>,
    pub(super) rx: Arc<ShimFd>,
}

/// A mailbox message: placeholder source port, logical peer, expiry (unix seconds).
const MAIL_LEN: usize = 2 + 4 + 2 + 8;

impl Mailbox {
    pub(super) fn open() -> Result<Mailbox, c_int> {
        let mut sv = [0 as c_int; 2];
        // SAFETY: sv is a writable array of two ints.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(crate::sys::errno());
        }
        let tx = fdtable::own_fd(sv[0], "gcb-mailbox").inspect_err(|_| net::close(sv[1]))?;
        let rx = fdtable::own_fd(sv[1], "gcb-mailbox").inspect_err(|_| drop_owned(&tx))?;
        Ok(Mailbox { tx, rx })
    }

    fn encode(key: u16, peer: SocketAddrV4, expires: u64) -> [u8; MAIL_LEN] {
        let mut m = [0u8; MAIL_LEN];
        m[0..2].copy_from_slice(&key.to_be_bytes());
        m[2..6].copy_from_slice(&peer.ip().octets());
        m[6..8].copy_from_slice(&peer.port().to_be_bytes());
        m[8..16].copy_from_slice(&expires.to_be_bytes());
        m
    }

    fn decode(m: &[u8; MAIL_LEN]) -> (u16, SocketAddrV4, u64) {
        let key = u16::from_be_bytes([m[0], m[1]]);
        let ip = Ipv4Addr::new(m[2], m[3], m[4], m[5]);
        let port = u16::from_be_bytes([m[6], m[7]]);
        let exp = u64::from_be_bytes(m[8..16].try_into().unwrap_or([0; 8]));
        (key, SocketAddrV4::new(ip, port), exp)
    }

    /// Post connection `fd` under `key` (the kernel keeps a reference in flight).
    pub(super) fn post(&self, key: u16, peer: SocketAddrV4, fd: c_int) -> Result<(), c_int> {
        let expires = now().unix_ms / 1000 + READY_TTL_SECS;
        self.send(&Self::encode(key, peer, expires), fd)
    }

    fn send(&self, msg: &[u8; MAIL_LEN], fd: c_int) -> Result<(), c_int> {
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: zeroed msghdr is valid; we fill the fields we use.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space;
        // SAFETY: mh points at a control buffer of `space` bytes, enough for one
        // SCM_RIGHTS header carrying one int; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        let r = unsafe {
            let cm = libc::CMSG_FIRSTHDR(&mh);
            (*cm).cmsg_level = libc::SOL_SOCKET;
            (*cm).cmsg_type = libc::SCM_RIGHTS;
            (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut c_int, fd);
            libc::sendmsg(self.tx.fd(), &mh, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if r < 0 {
            Err(crate::sys::errno())
        } else {
            Ok(())
        }
    }

    /// One message from the mailbox, if any: (message, fd).
    fn recv(&self) -> Option<([u8; MAIL_LEN], c_int)> {
        let mut msg = [0u8; MAIL_LEN];
        let mut iov = libc::iovec {
            iov_base: msg.as_mut_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: zeroed msghdr is valid; we fill the fields we use.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space;
        // SAFETY: mh describes valid buffers owned by this frame. MSG_CMSG_CLOEXEC: a
        // received fd is ours until handed to the program.
        let n = unsafe {
            libc::recvmsg(
                self.rx.fd(),
                &mut mh,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n != MAIL_LEN as isize {
            return None;
        }
        // SAFETY: the kernel filled mh's control buffer; CMSG_* walk stays inside it.
        let fd = unsafe {
            let cm = libc::CMSG_FIRSTHDR(&mh);
            if cm.is_null()
                || (*cm).cmsg_level != libc::SOL_SOCKET
                || (*cm).cmsg_type != libc::SCM_RIGHTS
            {
                return None;
            }
            std::ptr::read_unaligned(libc::CMSG_DATA(cm) as *const c_int)
        };
        Some((msg, fd))
    }

    /// Take the connection posted under `key`, waiting up to `patience`. Messages for
    /// other keys are posted back; expired ones are closed.
    pub(super) fn take(&self, key: u16, patience: Duration) -> Option<(c_int, SocketAddrV4)> {
        let deadline = Instant::now() + patience;
        loop {
            let mut others = Vec::new();
            let mut found = None;
            let now_s = now().unix_ms / 1000;
            while let Some((msg, fd)) = self.recv() {
                let (k, peer, exp) = Self::decode(&msg);
                if k == key && found.is_none() {
                    found = Some((fd, peer));
                } else if exp < now_s {
                    crate::warn!(
                        "brokered connection from {} was never accepted; closed",
                        peer
                    );
                    net::close(fd);
                } else {
                    others.push((msg, fd));
                }
            }
            for (msg, fd) in others {
                if self.send(&msg, fd).is_err() {
                    crate::warn!("mailbox full; dropped a brokered connection");
                }
                net::close(fd);
            }
            if let Some((fd, peer)) = found {
                // The program's connection: inheritable unless accept4 asked otherwise.
                let _ = crate::sys::fcntl_raw(fd, libc::F_SETFD, 0);
                return Some((fd, peer));
            }
            if Instant::now() >= deadline {
                return None;
            }
            let _ = net::wait_fd(self.rx.fd(), libc::POLLIN, Duration::from_millis(5));
        }
    }
}
