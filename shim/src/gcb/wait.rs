//! The AEH inside the program's readiness calls (paper 4.2.1: the asynchronous event
//! handler runs inside the interposed blocking calls): poll/ppoll, select/pselect and
//! epoll_wait family. Each adds the client's management sockets to what the program waits
//! for, waits in slices bounded by the client's next timer, runs the AEH on its own
//! readiness and hides its own fds from the result.

use libc::c_int;
use std::time::{Duration, Instant};

use crate::abi::{Outcome, WaitCall};
use crate::net;

use super::core::{deadline_of, expired, slice_ms, GcbLayer};

/// Tag of our control socket in a program's epoll set.
const EPOLL_TAG: u64 = 0x6763_625f_6374_6c00; // "gcb_ctl\0"

impl GcbLayer {
    fn wait_poll(
        &self,
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        timeout_ms: c_int,
        ts: *const libc::timespec,
        sigmask: *const libc::sigset_t,
    ) -> Outcome<c_int> {
        let Some((ours, mut wake)) = self.aeh() else {
            return Outcome::Bypass("no GCB management sockets to watch");
        };
        let deadline = deadline_of(timeout_ms, ts);
        let n = nfds as usize;
        let mut set: Vec<libc::pollfd> = Vec::with_capacity(n + 1);
        if n > 0 {
            // SAFETY: the program passed `nfds` valid pollfd entries at `fds`.
            set.extend_from_slice(unsafe { std::slice::from_raw_parts(fds, n) });
        }
        set.extend(ours.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        loop {
            let ms = slice_ms(deadline, wake);
            let tspec = (ms >= 0).then(|| libc::timespec {
                tv_sec: (ms / 1000) as libc::time_t,
                tv_nsec: ((ms % 1000) as libc::c_long) * 1_000_000,
            });
            let tptr = tspec
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: set is a valid pollfd array of its length; tptr/sigmask are null or
            // valid for the call.
            let r =
                unsafe { libc::ppoll(set.as_mut_ptr(), set.len() as libc::nfds_t, tptr, sigmask) };
            if r < 0 {
                return Outcome::Error(net::errno());
            }
            let aeh_ready = set[n..].iter().any(|p| p.revents != 0);
            if aeh_ready || r == 0 {
                for p in &mut set[n..] {
                    p.revents = 0;
                }
                wake = self.pump().and_then(|(_, w)| w);
            }
            for p in set[..n].iter_mut() {
                if p.revents & libc::POLLIN != 0 && !self.udp_has_program_data(p.fd) {
                    // Only the shim's own datagrams were queued (now handled).
                    p.revents &= !(libc::POLLIN | libc::POLLRDNORM);
                }
            }
            let ready = set[..n].iter().filter(|p| p.revents != 0).count();
            if ready > 0 || expired(deadline) {
                if n > 0 {
                    // SAFETY: as above, `fds` holds `n` writable entries.
                    let out = unsafe { std::slice::from_raw_parts_mut(fds, n) };
                    for (o, s) in out.iter_mut().zip(&set[..n]) {
                        o.revents = s.revents;
                    }
                }
                return Outcome::Handled(ready as c_int);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_select(
        &self,
        nfds: c_int,
        read: *mut libc::fd_set,
        write: *mut libc::fd_set,
        except: *mut libc::fd_set,
        deadline: Option<Instant>,
        sigmask: *const libc::sigset_t,
        tv_out: *mut libc::timeval,
    ) -> Outcome<c_int> {
        let Some((ours, mut wake)) = self.aeh() else {
            return Outcome::Bypass("no GCB management sockets to watch");
        };
        let ours: Vec<c_int> = ours
            .into_iter()
            .filter(|&fd| fd < libc::FD_SETSIZE as c_int)
            .collect();
        let Some(&top) = ours.iter().max() else {
            return Outcome::Bypass("no management socket fits in an fd_set");
        };
        // SAFETY: fd_set is plain data; copies of the program's sets (null = empty/absent).
        let copy = |p: *mut libc::fd_set| (!p.is_null()).then(|| unsafe { *p });
        let (r0, w0, e0) = (copy(read), copy(write), copy(except));
        loop {
            // SAFETY: zeroed fd_set is the empty set.
            let mut rs: libc::fd_set = r0.unwrap_or_else(|| unsafe { std::mem::zeroed() });
            let mut ws = w0;
            let mut es = e0;
            for &fd in &ours {
                // SAFETY: fd < FD_SETSIZE, filtered above.
                unsafe { libc::FD_SET(fd, &mut rs) };
            }
            let ms = slice_ms(deadline, wake);
            let tspec = (ms >= 0).then(|| libc::timespec {
                tv_sec: (ms / 1000) as libc::time_t,
                tv_nsec: ((ms % 1000) as libc::c_long) * 1_000_000,
            });
            let tptr = tspec
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            let wp = ws.as_mut().map_or(std::ptr::null_mut(), |s| s as *mut _);
            let ep = es.as_mut().map_or(std::ptr::null_mut(), |s| s as *mut _);
            // SAFETY: all set pointers are null or point at local fd_sets; nfds covers ours.
            let r = unsafe { libc::pselect(nfds.max(top + 1), &mut rs, wp, ep, tptr, sigmask) };
            if r < 0 {
                return Outcome::Error(net::errno());
            }
            let mut ctl_ready = false;
            for &fd in &ours {
                // SAFETY: rs is a valid set and fd < FD_SETSIZE.
                unsafe {
                    if libc::FD_ISSET(fd, &rs) {
                        ctl_ready = true;
                        libc::FD_CLR(fd, &mut rs);
                    }
                }
            }
            if ctl_ready || r == 0 {
                wake = self.pump().and_then(|(_, w)| w);
            }
            if r0.is_some() {
                for fd in 0..nfds.min(libc::FD_SETSIZE as c_int) {
                    // SAFETY: fd < FD_SETSIZE; rs is a valid set.
                    if unsafe { libc::FD_ISSET(fd, &rs) } && !self.udp_has_program_data(fd) {
                        // Only the shim's own datagrams were queued (now handled).
                        // SAFETY: as above.
                        unsafe { libc::FD_CLR(fd, &mut rs) };
                    }
                }
            }
            let count = |s: &libc::fd_set| {
                // SAFETY: i < nfds <= FD_SETSIZE (the program's own contract).
                (0..nfds)
                    .filter(|&i| unsafe { libc::FD_ISSET(i, s) })
                    .count()
            };
            let ready = (r0.map(|_| count(&rs)).unwrap_or(0))
                + ws.as_ref().map_or(0, count)
                + es.as_ref().map_or(0, count);
            if ready > 0 || expired(deadline) {
                // SAFETY: each non-null program pointer is a writable fd_set.
                unsafe {
                    if !read.is_null() {
                        *read = rs;
                    }
                    if let Some(s) = ws {
                        *write = s;
                    }
                    if let Some(s) = es {
                        *except = s;
                    }
                    if !tv_out.is_null() {
                        let left = deadline
                            .map(|d| d.saturating_duration_since(Instant::now()))
                            .unwrap_or_default();
                        (*tv_out).tv_sec = left.as_secs() as libc::time_t;
                        (*tv_out).tv_usec = left.subsec_micros() as libc::suseconds_t;
                    }
                }
                return Outcome::Handled(ready as c_int);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_epoll(
        &self,
        epfd: c_int,
        events: *mut libc::epoll_event,
        maxevents: c_int,
        timeout_ms: c_int,
        ts: *const libc::timespec,
        sigmask: *const libc::sigset_t,
    ) -> Outcome<c_int> {
        let Some((ours, mut wake)) = self.aeh() else {
            return Outcome::Bypass("no GCB management sockets to watch");
        };
        if maxevents <= 0 || events.is_null() {
            return Outcome::Bypass("no room for events: the kernel reports the error");
        }
        {
            let mut c = self.client.lock();
            let watch = c.watch_fd();
            for fd in ours {
                // Added on every wait (EEXIST is the usual answer): a cache keyed by the
                // epoll fd's number would go stale when the program closes the epoll set
                // and a new one gets the same number. The standby watch is edge-triggered
                // (see `standby`: a fork child sharing the set must not spin on it).
                let edge = if Some(fd) == watch {
                    libc::EPOLLET as u32
                } else {
                    0
                };
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32 | edge,
                    u64: EPOLL_TAG,
                };
                // SAFETY: ev is a valid epoll_event; failure (EEXIST etc.) is harmless.
                let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                if r == 0 || net::errno() == libc::EEXIST {
                    c.epolls.insert((epfd, fd));
                } else {
                    return Outcome::Bypass("cannot add the management sockets to this epoll set");
                }
            }
        }
        let deadline = deadline_of(timeout_ms, ts);
        loop {
            let ms = slice_ms(deadline, wake);
            // SAFETY: events holds maxevents writable entries (program's contract).
            let r = unsafe { libc::epoll_pwait(epfd, events, maxevents, ms, sigmask) };
            if r < 0 {
                return Outcome::Error(net::errno());
            }
            // SAFETY: the kernel filled `r` entries.
            let evs = unsafe { std::slice::from_raw_parts_mut(events, r as usize) };
            let mut kept = 0;
            let mut ours = false;
            for i in 0..evs.len() {
                if evs[i].u64 == EPOLL_TAG {
                    ours = true;
                } else {
                    evs[kept] = evs[i];
                    kept += 1;
                }
            }
            if ours || r == 0 {
                wake = self.pump().and_then(|(_, w)| w);
            }
            let kept = self.hide_shim_only_readiness(epfd, &mut evs[..kept]);
            if kept > 0 || expired(deadline) {
                return Outcome::Handled(kept as c_int);
            }
        }
    }

    pub(super) fn wait(&self, call: WaitCall) -> Outcome<c_int> {
        match call {
            WaitCall::Poll {
                fds,
                nfds,
                timeout_ms,
                timeout,
                sigmask,
            } => self.wait_poll(fds, nfds, timeout_ms, timeout, sigmask),
            WaitCall::Select {
                nfds,
                read,
                write,
                except,
                timeout,
            } => {
                let deadline = (!timeout.is_null())
                    .then(|| {
                        // SAFETY: the program passed a valid timeval.
                        let t = unsafe { *timeout };
                        Instant::now().checked_add(Duration::new(
                            t.tv_sec.max(0) as u64,
                            (t.tv_usec.clamp(0, 999_999) * 1000) as u32,
                        ))
                    })
                    .flatten();
                self.wait_select(
                    nfds,
                    read,
                    write,
                    except,
                    deadline,
                    std::ptr::null(),
                    timeout,
                )
            }
            WaitCall::PSelect {
                nfds,
                read,
                write,
                except,
                timeout,
                sigmask,
            } => {
                let deadline = deadline_of(if timeout.is_null() { -1 } else { -2 }, timeout);
                self.wait_select(
                    nfds,
                    read,
                    write,
                    except,
                    deadline,
                    sigmask,
                    std::ptr::null_mut(),
                )
            }
            WaitCall::Epoll {
                epfd,
                events,
                maxevents,
                timeout_ms,
                timeout,
                sigmask,
            } => self.wait_epoll(epfd, events, maxevents, timeout_ms, timeout, sigmask),
        }
    }
}
