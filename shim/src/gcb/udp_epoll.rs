//! epoll readiness of registered UDP sockets: what select() and poll() already do
//! ([`GcbLayer::udp_has_program_data`]), for epoll.
//!
//! A registered UDP socket also receives the shim's own datagrams (a punching peer's
//! `Dummy`, a `DummyAck`, stray frames). Each makes the socket readable, but none is for
//! the program: a program that waits in epoll_wait() and then calls a *blocking*
//! recvfrom() would block there until a real datagram came, and serve none of its other
//! sockets meanwhile. So when epoll_wait() reports EPOLLIN for such a socket, the shim
//! handles the frames at the head of its queue (as the receive path would) and, if nothing
//! for the program is left, takes EPOLLIN out of the event (and the event out of the
//! list if nothing else is in it).
//!
//! epoll events carry the program's `data`, not the fd, so the shim notes in
//! `epoll_ctl()` which data word names which UDP socket in which epoll set
//! (`GcbLayer::note_udp_epoll_ctl`). That note can go stale (an epoll fd closed and its
//! number reused, two fds with one data word), so before an event is changed the kernel's
//! own table (`/proc/self/fdinfo/EPFD`) must confirm that exactly one entry of that set
//! carries the data word and that it is that fd and that socket (inode). Without that
//! confirmation (no /proc, say) the event is left as it is: at worst one spurious wakeup,
//! as the kernel itself may give (select(2), BUGS). A hidden one-shot event is re-armed,
//! since the program never saw it and will not re-arm it itself.

use libc::{c_int, epoll_event};

use super::core::GcbLayer;
use crate::fdtable::FdEntry;
use std::sync::Arc;

/// Most notes kept (a program that leaks epoll sets must not grow this without bound).
const MAX_NOTES: usize = 4096;

const READ_BITS: u32 = (libc::EPOLLIN | libc::EPOLLRDNORM) as u32;

impl GcbLayer {
    /// epoll_ctl(`epfd`, `op`, `fd`, `ev`) on a managed socket, before the real call: note
    /// where a UDP socket's events go. Never changes the call.
    pub(super) fn note_udp_epoll_ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        entry: &Arc<FdEntry>,
        ev: *const epoll_event,
    ) {
        if super::udp::state(entry).is_none() && !crate::net::is_udp4(fd) {
            return;
        }
        let event = match op {
            // SAFETY: for ADD and MOD the program passes a valid epoll_event (a null one
            // is the kernel's EFAULT to report, and is skipped here).
            libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD if !ev.is_null() => Some(unsafe { *ev }),
            libc::EPOLL_CTL_DEL => None,
            _ => return,
        };
        let mut c = self.client().lock();
        c.udp_epoll.retain(|k, v| !(k.0 == epfd && v.0 == fd));
        if let Some(e) = event {
            if c.udp_epoll.len() >= MAX_NOTES {
                c.udp_epoll.clear();
            }
            // Copies out of the packed struct.
            let (data, mask) = (e.u64, e.events);
            c.udp_epoll.insert((epfd, data), (fd, mask));
        }
    }

    /// The program closed `fd`: its notes go (the kernel drops the registration with the
    /// last fd of the socket; a dup keeps it, and then the event is simply not filtered).
    pub(super) fn forget_udp_epoll(&self, fd: c_int) {
        let mut c = self.client().lock();
        if !c.udp_epoll.is_empty() {
            c.udp_epoll.retain(|_, v| v.0 != fd);
        }
    }

    /// The events epoll_wait(`epfd`) returned for the program: drops readiness that only
    /// the shim's own datagrams caused (see the module docs). Returns how many of `evs`
    /// (compacted to the front) the program gets.
    pub(super) fn hide_shim_only_readiness(&self, epfd: c_int, evs: &mut [epoll_event]) -> usize {
        let candidates: Vec<(usize, c_int, u32)> = {
            let c = self.client().lock();
            if c.udp_epoll.is_empty() {
                return evs.len();
            }
            evs.iter()
                .enumerate()
                .filter(|(_, e)| e.events & READ_BITS != 0)
                .filter_map(|(i, e)| {
                    let data = e.u64;
                    c.udp_epoll
                        .get(&(epfd, data))
                        .map(|&(fd, mask)| (i, fd, mask))
                })
                .collect()
        };
        if candidates.is_empty() {
            return evs.len();
        }
        let mut hidden = vec![false; evs.len()];
        for (i, fd, mask) in candidates {
            let data = evs[i].u64;
            if self.udp_has_program_data(fd) || !kernel_confirms(epfd, data, fd) {
                continue;
            }
            crate::trace!("epoll {}: fd {} readable only by shim datagrams", epfd, fd);
            evs[i].events &= !READ_BITS;
            if evs[i].events != 0 {
                continue; // e.g. EPOLLOUT: the program still gets that
            }
            hidden[i] = true;
            if mask & libc::EPOLLONESHOT as u32 != 0 {
                let mut ev = epoll_event {
                    events: mask,
                    u64: data,
                };
                // SAFETY: ev is a valid epoll_event; epfd and fd are the program's, and
                // re-arming is what the program would do after seeing the event.
                unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) };
            }
        }
        let mut kept = 0;
        for i in 0..evs.len() {
            if !hidden[i] {
                evs[kept] = evs[i];
                kept += 1;
            }
        }
        kept
    }
}

/// The kernel's table of epoll set `epfd` has exactly one entry with `data`, and it is
/// `fd`, still the same socket (inode). False when that cannot be read.
fn kernel_confirms(epfd: c_int, data: u64, fd: c_int) -> bool {
    // SAFETY: zeroed stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer; fd is the program's (a closed fd gives EBADF).
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")) else {
        return false;
    };
    let mut matches = info
        .lines()
        .filter_map(parse_fdinfo_target)
        .filter(|t| t.data == data);
    match (matches.next(), matches.next()) {
        (Some(t), None) => t.fd == fd && t.ino == st.st_ino as u64,
        _ => false,
    }
}

/// One `tfd:` line of an epoll fd's fdinfo (fs/eventpoll.c, `ep_show_fdinfo`):
/// `tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x`.
#[derive(Debug, PartialEq, Eq)]
struct FdinfoTarget {
    fd: c_int,
    data: u64,
    ino: u64,
}

fn parse_fdinfo_target(line: &str) -> Option<FdinfoTarget> {
    let mut w = line.split_whitespace();
    if w.next()? != "tfd:" {
        return None;
    }
    let fd = w.next()?.parse().ok()?;
    let mut data = None;
    let mut ino = None;
    while let Some(word) = w.next() {
        if word == "data:" {
            data = u64::from_str_radix(w.next()?, 16).ok();
        } else if let Some(v) = word.strip_prefix("ino:") {
            ino = u64::from_str_radix(v, 16).ok();
        }
    }
    Some(FdinfoTarget {
        fd,
        data: data?,
        ino: ino?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_fdinfo_lines() {
        assert_eq!(
            parse_fdinfo_target(
                "tfd:        7 events:       19 data: ffffffffffffffff  pos:0 ino:61d sdev:7"
            ),
            Some(FdinfoTarget {
                fd: 7,
                data: u64::MAX,
                ino: 0x61d
            })
        );
        for bad in [
            "pos:\t0",
            "tfd: x events: 1 data: 5 pos:0 ino:1 sdev:7",
            "tfd: 7 events: 1 data: zz pos:0 ino:1 sdev:7",
            "tfd: 7 events: 1 data: 5 pos:0 sdev:7",
            "tfd: 7 events: 1 data:",
            "tfd:",
        ] {
            assert_eq!(parse_fdinfo_target(bad), None, "{bad}");
        }
    }

    /// The parser against this kernel's real output: a socket added with a data word.
    #[test]
    fn confirms_against_this_kernel() {
        // SAFETY: plain syscalls on fds this test owns.
        unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let s2 = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(ep >= 0 && s >= 0 && s2 >= 0);
            let mut ev = epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0xfeed_0000_0000_0001,
            };
            assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s, &mut ev), 0);
            assert!(kernel_confirms(ep, 0xfeed_0000_0000_0001, s));
            assert!(!kernel_confirms(ep, 0xfeed_0000_0000_0001, s2), "other fd");
            assert!(!kernel_confirms(ep, 1, s), "other data");
            // Two entries with the same data word: ambiguous.
            assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s2, &mut ev), 0);
            assert!(!kernel_confirms(ep, 0xfeed_0000_0000_0001, s));
            libc::close(s2);
            libc::close(s);
            libc::close(ep);
        }
    }
}
