//! Dial-backs in flight: the outgoing connections a `connect_back` asks for.
//!
//! The broker's `connect_back` names an address to dial (the connector for a reversed
//! connection, the broker's relay port otherwise). The asynchronous event handler runs
//! inside the program's blocking calls, so it must never wait for a dial there: a dial
//! to a dead address would stall every accept/poll/epoll of the program for the whole
//! dial timeout. So a dial is started non-blocking and kept here; the AEH waits on it
//! through the standby watch (see [`super::standby::Watch`]) together with everything
//! else, and [`Dials::poll`] reports it when it connects, fails or times out.
//!
//! Like [`crate::net::connect_race`], a fresh attempt is started every
//! `DIAL_SPACING` until one connects (Linux retries a lost SYN only after 1 s and 3 s),
//! within bounds: at most [`MAX_DIALS`] dials and [`MAX_ATTEMPT_FDS`] sockets in flight,
//! [`MAX_ATTEMPTS`] attempts per dial, each dial given up after its timeout.

use libc::c_int;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::standby::Watch;
use crate::control::drop_owned;
use crate::fdtable::{self, ShimFd};
use crate::net;

/// Dials in flight at most; a `connect_back` beyond this is refused.
pub const MAX_DIALS: usize = 64;
/// Sockets of all dials in flight at most (they count against the program's fd limit).
pub const MAX_ATTEMPT_FDS: usize = 128;
/// Attempts one dial starts at most.
pub const MAX_ATTEMPTS: u8 = 8;

/// One dial in flight, dialing `target` for `what` in `family`.
struct Dial<T> {
    target: SocketAddrV4,
    family: c_int,
    what: T,
    /// The attempts racing (shim-owned, non-blocking, close-on-exec).
    attempts: Vec<Arc<ShimFd>>,
    started: u8,
    next_attempt: Instant,
    deadline: Instant,
    last_err: c_int,
}

/// What [`Dials::poll`] found.
pub enum DialEvent<T> {
    /// Connected: the connection (a plain fd of ours: blocking, close-on-exec).
    Connected(c_int, SocketAddrV4, T),
    /// Gave up: why.
    Failed(SocketAddrV4, T, String),
}

/// The dials in flight of one process.
pub struct Dials<T> {
    list: Vec<Dial<T>>,
    spacing: Duration,
}

/// How a new attempt went.
enum Attempt {
    Connected(c_int),
    InProgress(Arc<ShimFd>),
    Failed(c_int),
}

/// Start one non-blocking connect to `target` from a socket of `family`, waiting at most
/// `quick` for it to complete (then it never enters the fd table or the watch: the fast
/// path).
fn attempt(target: SocketAddrV4, family: c_int, quick: Duration, watch: Option<&Watch>) -> Attempt {
    let fd = match net::socket_as(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, false) {
        Ok(fd) => fd,
        Err(e) => return Attempt::Failed(e),
    };
    let connected = match net::connect_as(fd, target, family) {
        Err(libc::EINPROGRESS) if !quick.is_zero() => {
            match net::wait_fd(fd, libc::POLLOUT, quick) {
                Ok(true) => match net::so_error(fd) {
                    0 => Ok(()),
                    e => Err(e),
                },
                Ok(false) => Err(libc::EINPROGRESS),
                Err(e) => Err(e),
            }
        }
        r => r,
    };
    match connected {
        Ok(()) => {
            let _ = net::set_nonblocking(fd, false);
            Attempt::Connected(fd)
        }
        Err(libc::EINPROGRESS) => match fdtable::own_fd(fd, "gcb-dial") {
            Ok(owned) => {
                if let Some(w) = watch {
                    w.add_connecting(owned.fd());
                }
                Attempt::InProgress(owned)
            }
            Err(e) => {
                net::close(fd);
                Attempt::Failed(e)
            }
        },
        Err(e) => {
            net::close(fd);
            Attempt::Failed(e)
        }
    }
}

/// A connected attempt becomes a plain fd of ours (blocking, close-on-exec, out of the
/// fd table, at an ordinary number: it becomes the program's connection).
fn into_connection(s: &Arc<ShimFd>, watch: Option<&Watch>) -> Result<c_int, c_int> {
    let fd = s.fd();
    if let Some(w) = watch {
        w.remove(fd);
    }
    let _ = net::set_nonblocking(fd, false);
    let dup = crate::sys::fcntl_raw(fd, libc::F_DUPFD_CLOEXEC, 0);
    drop_owned(s);
    dup
}

fn close_attempt(s: &Arc<ShimFd>, watch: Option<&Watch>) {
    if let Some(w) = watch {
        w.remove(s.fd());
    }
    drop_owned(s);
}

impl<T> Dials<T> {
    pub fn new(spacing: Duration) -> Dials<T> {
        Dials {
            list: Vec::new(),
            spacing,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.list.len() >= MAX_DIALS
    }

    fn attempt_fds(&self) -> usize {
        self.list.iter().map(|d| d.attempts.len()).sum()
    }

    /// Start dialing `target` for `what` from sockets of `family` (the listener's: the
    /// connection becomes one it accepts), giving up after `timeout`. If it connects
    /// within `quick` (a bounded wait, for a dial expected to complete at once: the
    /// broker's relay port on the LAN), returns the connection at once; otherwise the
    /// dial is in flight (`Ok(None)`) and [`Self::poll`] reports it. `Err((errno, what))`:
    /// it could not even start (or the list is full: `EAGAIN`).
    #[allow(clippy::type_complexity)]
    pub fn start(
        &mut self,
        target: SocketAddrV4,
        family: c_int,
        what: T,
        timeout: Duration,
        quick: Duration,
        watch: Option<&Watch>,
    ) -> Result<Option<(c_int, T)>, (c_int, T)> {
        if self.is_full() {
            return Err((libc::EAGAIN, what));
        }
        let s = match attempt(target, family, quick, watch) {
            Attempt::Connected(fd) => return Ok(Some((fd, what))),
            Attempt::Failed(e) => return Err((e, what)),
            Attempt::InProgress(s) => s,
        };
        let now = Instant::now();
        self.list.push(Dial {
            target,
            family,
            what,
            attempts: vec![s],
            started: 1,
            next_attempt: now + self.spacing,
            deadline: now + timeout,
            last_err: libc::ETIMEDOUT,
        });
        Ok(None)
    }

    /// Complete, fail, time out or re-attempt the dials in flight (one poll(2) over
    /// all their sockets, no waiting).
    pub fn poll(&mut self, now: Instant, watch: Option<&Watch>) -> Vec<DialEvent<T>> {
        let mut events = Vec::new();
        if self.list.is_empty() {
            return events;
        }
        let mut set: Vec<libc::pollfd> = self
            .list
            .iter()
            .flat_map(|d| d.attempts.iter())
            .map(|s| libc::pollfd {
                fd: s.fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        if !set.is_empty() {
            // SAFETY: set is a valid pollfd array of its length; timeout 0.
            let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, 0) };
            if r < 0 {
                set.iter_mut().for_each(|p| p.revents = 0);
            }
        }
        let mut ready = set.iter().map(|p| p.revents != 0);
        let mut budget = MAX_ATTEMPT_FDS.saturating_sub(self.attempt_fds());
        let mut keep = Vec::with_capacity(self.list.len());
        for mut d in self.list.drain(..) {
            let mut winner: Option<Result<c_int, c_int>> = None;
            let mut alive = Vec::with_capacity(d.attempts.len());
            for s in std::mem::take(&mut d.attempts) {
                if !ready.next().unwrap_or(false) || winner.is_some() {
                    alive.push(s);
                    continue;
                }
                match net::so_error(s.fd()) {
                    0 => winner = Some(into_connection(&s, watch)),
                    e => {
                        d.last_err = e;
                        close_attempt(&s, watch);
                        budget += 1;
                    }
                }
            }
            if let Some(w) = winner {
                for s in &alive {
                    close_attempt(s, watch);
                }
                budget += alive.len();
                events.push(match w {
                    Ok(fd) => DialEvent::Connected(fd, d.target, d.what),
                    Err(e) => DialEvent::Failed(d.target, d.what, net::errstr(e)),
                });
                continue;
            }
            d.attempts = alive;
            let due = now < d.deadline && now >= d.next_attempt && d.started < MAX_ATTEMPTS;
            if due {
                // Also when the budget is spent: the next chance is one spacing away.
                d.next_attempt = now + self.spacing;
            }
            if due && budget > 0 {
                d.started += 1;
                match attempt(d.target, d.family, Duration::ZERO, watch) {
                    Attempt::Connected(fd) => {
                        for s in &d.attempts {
                            close_attempt(s, watch);
                        }
                        budget += d.attempts.len();
                        events.push(DialEvent::Connected(fd, d.target, d.what));
                        continue;
                    }
                    Attempt::InProgress(s) => {
                        budget -= 1;
                        d.attempts.push(s);
                    }
                    Attempt::Failed(e) => d.last_err = e,
                }
            }
            let exhausted = d.attempts.is_empty() && d.started >= MAX_ATTEMPTS;
            if now >= d.deadline || exhausted {
                for s in &d.attempts {
                    close_attempt(s, watch);
                }
                budget += d.attempts.len();
                let why = if now >= d.deadline && !d.attempts.is_empty() {
                    "timed out".to_owned()
                } else {
                    net::errstr(d.last_err)
                };
                events.push(DialEvent::Failed(d.target, d.what, why));
                continue;
            }
            keep.push(d);
        }
        self.list = keep;
        events
    }

    /// When the dials need the AEH even if no socket becomes ready: the next attempt or
    /// a deadline (the watch reports completions; with no watch, check often).
    pub fn wakeup(&self, watched: bool) -> Option<Instant> {
        let mut t = self
            .list
            .iter()
            .map(|d| {
                if d.started < MAX_ATTEMPTS {
                    d.next_attempt.min(d.deadline)
                } else {
                    d.deadline
                }
            })
            .min()?;
        if !watched {
            t = t.min(Instant::now() + Duration::from_millis(10));
        }
        Some(t)
    }

    /// In a fork child: the dials are the parent's; close our copies (the parent's
    /// watch keeps its entries: the sockets stay open there).
    pub fn forget_in_child(&mut self) {
        for d in self.list.drain(..) {
            for s in &d.attempts {
                drop_owned(s);
            }
        }
    }
}
