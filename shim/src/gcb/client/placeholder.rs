//! Handing a brokered connection to the program: the connection goes into the family's
//! mailbox ([`super::mailbox`]) and a placeholder connection into the listening socket's
//! kernel queue, so that accept()/select()/poll()/epoll() see it in arrival order;
//! accept() then swaps the placeholder for the connection ([`Client::take_ready`]). A
//! blocking accept() on the very listener gets it directly, without a placeholder.

use libc::c_int;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::mailbox::READY_TTL;
use super::state::Client;
use crate::net::{self, errstr};

/// Source address of placeholder connections to wildcard-bound listeners: a loopback
/// address no ordinary client uses, so accept() knows a placeholder when it sees one.
pub const PLACEHOLDER_IP: Ipv4Addr = Ipv4Addr::new(127, 71, 66, 1);

impl Client {
    /// Give brokered connection `fd` (ours; closed here) to the program: post it to
    /// the mailbox and put a placeholder connection into the listening socket's kernel
    /// queue so that accept()/select()/poll()/epoll() see it in arrival order.
    pub(super) fn hand_over(
        &mut self,
        fd: c_int,
        listen_at: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Result<SocketAddrV4, String> {
        let err = |what: &str, e: c_int| format!("{what}: {}", errstr(e));
        if self.direct.is_none() && self.direct_for == Some(listen_at) {
            // The program is blocked in accept() on this very listener: hand it over
            // directly (no placeholder handshake, no mailbox round trip).
            self.direct = Some((fd, peer));
            return Ok(listen_at);
        }
        let Some(mailbox) = self.mailbox.as_ref() else {
            net::close(fd);
            return Err("no mailbox".into());
        };
        let ph = net::socket(libc::SOCK_STREAM | libc::SOCK_NONBLOCK, false)
            .map_err(|e| err("placeholder socket", e));
        let ph = match ph {
            Ok(ph) => ph,
            Err(e) => {
                net::close(fd);
                return Err(e);
            }
        };
        let src = if listen_at.ip().is_loopback() {
            PLACEHOLDER_IP
        } else {
            *listen_at.ip()
        };
        let key = net::bind(ph, SocketAddrV4::new(src, 0))
            .map_err(|e| err("placeholder bind", e))
            .and_then(|_| net::sock_name(ph, false).ok_or_else(|| "placeholder name".into()))
            .and_then(|key| {
                mailbox
                    .post(key.port(), peer, fd)
                    .map_err(|e| err("mailbox", e))?;
                Ok(key)
            });
        // The mailbox holds its own reference to the connection now (or the post failed).
        net::close(fd);
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                net::close(ph);
                return Err(e);
            }
        };
        // Don't wait for the placeholder here: when the program's backlog is full the
        // kernel drops its SYN and retries later, and the program can only make room if
        // we return. A connected placeholder is closed by `reap_placeholders` (the queued
        // connection stays in the listener's backlog after we close our end).
        match net::connect_raw(ph, listen_at) {
            Ok(()) => net::close(ph),
            Err(libc::EINPROGRESS) => self.placeholders.push((ph, Instant::now() + READY_TTL)),
            Err(e) => {
                net::close(ph);
                return Err(err("placeholder connect", e));
            }
        }
        Ok(key)
    }

    /// Close placeholders whose connection completed (or failed, or waited too long).
    pub(super) fn reap_placeholders(&mut self) {
        let now = Instant::now();
        self.placeholders.retain(|&(ph, deadline)| {
            let done = net::wait_fd(ph, libc::POLLOUT, Duration::ZERO).unwrap_or(true);
            if done || now >= deadline {
                let e = net::so_error(ph);
                if e != 0 || !done {
                    crate::warn!(
                        "placeholder for a brokered connection failed: {}",
                        if done { errstr(e) } else { "timed out".into() }
                    );
                }
                net::close(ph);
                return false;
            }
            true
        });
    }

    /// accept() returned a connection from `peer`: if it is a placeholder, take the
    /// brokered connection it stands for from the mailbox.
    pub fn take_ready(&mut self, peer: SocketAddrV4) -> Option<(c_int, SocketAddrV4)> {
        let certain = *peer.ip() == PLACEHOLDER_IP;
        let maybe = self
            .regs
            .values()
            .any(|r| !r.listen_at.ip().is_loopback() && r.listen_at.ip() == peer.ip());
        if !certain && !maybe {
            return None;
        }
        let mailbox = self.mailbox.as_ref()?;
        // The dialer posts before it connects, so the message is there unless a sibling
        // is holding it for a moment while it looks for its own.
        let patience = if certain {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(20)
        };
        let r = mailbox.take(peer.port(), patience);
        if r.is_none() && certain {
            crate::warn!(
                "placeholder {} has no brokered connection in the mailbox",
                peer
            );
        }
        r
    }
}
