//! Standby connections (see `gcb_proto::preamble` and the broker's `standby` module).
//!
//! For each TCP registration this process made, the shim keeps one connection to the
//! broker's relay port that presented the registration's standby key
//! (`GCB-STANDBY <key>\n`). When a connection for the proxy arrives, the broker writes
//! a 12-byte claim naming the connector; the asynchronous event handler reads it,
//! answers one ack byte, and hands the connection to the program exactly like a
//! dialed-back one (mailbox + placeholder, so `accept()`/`poll()`/`epoll` see it), then
//! dials the next standby. This takes the `connect_back` datagram, the dial-back
//! handshake and the preamble off the critical path of every relayed connection.
//!
//! Standbys are watched through one epoll fd of the shim's (the *watch*), which the AEH
//! adds to the program's wait sets: the set of fds the program's waits include never
//! changes as standbys come and go. In a program's epoll set the watch is added
//! edge-triggered, so a fork child sharing that set with its parent gets at most one
//! wake-up per claim for a standby that is not its own (children close the standbys
//! and the watch they inherit; only the process that registered keeps standbys). If
//! the owner does not answer a claim within a second, the broker falls back to
//! `connect_back`, which any process of the family can serve.
//!
//! A standby that fails is dialed again after a back-off (200 ms, doubling to 30 s); one
//! the broker closes without a claim (a restarted broker that does not know the key until
//! the listener registers again, or one without room) only after a heartbeat interval,
//! since the heartbeat is what re-registers it (and a new registration dials at once).

use libc::c_int;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::drop_owned;
use crate::fdtable::{self, ShimFd};
use crate::net;
use gcb_proto::{preamble, tcp_punch};

/// First and longest pause before re-dialing a standby that failed.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One standby connection.
pub struct Standby {
    fd: Arc<ShimFd>,
    /// The TCP handshake completed and the preamble was sent.
    parked: bool,
    key: [u8; 16],
}

/// What [`Standby::poll`] found.
pub enum StandbyEvent {
    /// Nothing to do now.
    Idle,
    /// The broker claimed it for `peer`: the connection is the program's now (blocking
    /// mode, close-on-exec, not in the fd table).
    Claimed(c_int, SocketAddrV4),
    /// It failed or closed; the reason (empty: a normal close).
    Dead(String),
    /// The broker wrote a TCP punch claim (`gcb_proto::tcp_punch`), unverified: the
    /// caller checks it and punches from this standby's local port.
    PunchClaim([u8; tcp_punch::MSG_LEN]),
}

/// A registration's standby slot: the connection (if any) and the re-dial back-off.
pub struct StandbySlot {
    pub key: [u8; 16],
    pub conn: Option<Standby>,
    retry_at: Instant,
    backoff: Duration,
}

impl StandbySlot {
    pub fn new(key: [u8; 16]) -> StandbySlot {
        StandbySlot {
            key,
            conn: None,
            retry_at: Instant::now(),
            backoff: RETRY_MIN,
        }
    }

    /// Should a standby be dialed now?
    pub fn due(&self, now: Instant) -> bool {
        self.conn.is_none() && now >= self.retry_at
    }

    /// A standby failed: wait before the next dial, longer each time.
    pub fn failed(&mut self, now: Instant) {
        self.retry_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// A standby was refused by the broker: wait `wait` before the next dial (the back-off
    /// restarts after it).
    pub fn failed_for(&mut self, now: Instant, wait: Duration) {
        self.retry_at = now + wait;
        self.backoff = RETRY_MIN;
    }

    /// A standby worked (parked or claimed): the next one may be dialed at once.
    pub fn worked(&mut self) {
        self.backoff = RETRY_MIN;
        self.retry_at = Instant::now();
    }

    /// When the slot needs the AEH next: a pending dial, or a connect in progress.
    pub fn wakeup(&self) -> Option<Instant> {
        match &self.conn {
            None => Some(self.retry_at),
            // The watch reports the connect's completion; this is a safety net.
            Some(s) if !s.parked => Some(Instant::now() + Duration::from_millis(100)),
            Some(_) => None,
        }
    }
}

/// The parse of a standby key from a TCP registration's token (32 lowercase hex).
pub fn parse_key(token: &str) -> Option<[u8; 16]> {
    gcb_proto::ConnectId::parse(token)
        .ok()
        .map(|id| *id.as_bytes())
}

impl Standby {
    /// Start dialing the relay port (non-blocking), in `family`: the listener's, because
    /// a claimed standby becomes a connection the listener accepts (a dual-stack AF_INET6
    /// listener's accepted connections are AF_INET6 sockets).
    pub fn dial(relay: SocketAddrV4, key: [u8; 16], family: c_int) -> Result<Standby, c_int> {
        let fd = net::socket_as(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, false)?;
        // A TCP punch binds a second socket to this one's local port (see `tcp_punch`).
        net::set_sock_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        let fd = fdtable::own_fd(fd, "gcb-standby")?;
        match net::connect_as(fd.fd(), relay, family) {
            Ok(()) | Err(libc::EINPROGRESS) => Ok(Standby {
                fd,
                parked: false,
                key,
            }),
            Err(e) => {
                drop_owned(&fd);
                Err(e)
            }
        }
    }

    pub fn fd(&self) -> c_int {
        self.fd.fd()
    }

    pub fn parked(&self) -> bool {
        self.parked
    }

    /// Complete the connect and park (send the preamble); or look for a claim.
    /// Returns true when it just got parked (the caller adds it to the watch).
    pub fn poll(&mut self) -> (StandbyEvent, bool) {
        let fd = self.fd();
        if !self.parked {
            match net::wait_fd(fd, libc::POLLOUT, Duration::ZERO) {
                Ok(false) => return (StandbyEvent::Idle, false),
                Ok(true) => {}
                Err(e) => return (StandbyEvent::Dead(net::errstr(e)), false),
            }
            let e = net::so_error(fd);
            if e != 0 {
                return (
                    StandbyEvent::Dead(format!("dial: {}", net::errstr(e))),
                    false,
                );
            }
            let p = preamble::encode_standby(&self.key);
            // 45 bytes into a fresh connection's empty send buffer: all or nothing.
            if net::send_some(fd, &p) != Ok(p.len()) {
                return (StandbyEvent::Dead("preamble not sent".into()), false);
            }
            self.parked = true;
            return (StandbyEvent::Idle, true);
        }
        // One look at what arrived (a second look could see more than the first and read
        // the start of a punch claim as a short `GCB-GO`).
        let mut first = [0u8; tcp_punch::MSG_LEN];
        let n = match net::recv_peek(fd, &mut first) {
            Ok(0) => return (StandbyEvent::Dead(String::new()), false),
            Ok(n) => n,
            Err(libc::EAGAIN) => return (StandbyEvent::Idle, false),
            Err(e) => return (StandbyEvent::Dead(net::errstr(e)), false),
        };
        let head = &first[..n.min(6)];
        let (want, punch) = if tcp_punch::CLAIM_MAGIC.starts_with(head) {
            (tcp_punch::MSG_LEN, true)
        } else if preamble::GO_MAGIC.starts_with(head) {
            (preamble::GO_LEN, false)
        } else {
            return (StandbyEvent::Dead("junk instead of a claim".into()), false);
        };
        if n < want {
            return (StandbyEvent::Idle, false); // the rest is on its way
        }
        if punch {
            let _ = net::recv_some(fd, &mut first);
            return (StandbyEvent::PunchClaim(first), false);
        }
        let mut go = [0u8; preamble::GO_LEN];
        let _ = net::recv_some(fd, &mut go);
        let Some(peer) = preamble::parse_go(&go) else {
            return (StandbyEvent::Dead("junk instead of a claim".into()), false);
        };
        if net::send_some(fd, &[preamble::CLAIM_ACK]) != Ok(1) {
            return (StandbyEvent::Dead("claim ack not sent".into()), false);
        }
        (StandbyEvent::Claimed(fd, peer), false)
    }

    /// Give up the connection (closes our fd).
    pub fn close(self) {
        drop_owned(&self.fd);
    }

    /// The connection became the program's: return a plain fd for it (blocking mode,
    /// close-on-exec until the program takes it), out of the shim's fd table.
    pub fn into_connection(self) -> Result<c_int, c_int> {
        let fd = self.fd();
        let _ = net::set_nonblocking(fd, false);
        // A plain duplicate for the mailbox; our table entry goes with the original.
        let dup = crate::sys::fcntl_raw(fd, libc::F_DUPFD_CLOEXEC, 0);
        drop_owned(&self.fd);
        dup
    }

    /// Close a standby copy inherited across fork (the parent keeps its own).
    pub fn forget_in_child(self) {
        drop_owned(&self.fd);
    }
}

/// The shim's epoll fd that watches parked standbys.
pub struct Watch {
    fd: Arc<ShimFd>,
}

impl Watch {
    pub fn open() -> Result<Watch, c_int> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(crate::sys::errno());
        }
        Ok(Watch {
            fd: fdtable::own_fd(fd, "gcb-standby-watch")?,
        })
    }

    pub fn fd(&self) -> c_int {
        self.fd.fd()
    }

    fn ctl(&self, op: c_int, fd: c_int, events: c_int) {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: fd as u64,
        };
        // SAFETY: ev is a valid epoll_event; both fds are ours.
        unsafe { libc::epoll_ctl(self.fd(), op, fd, &mut ev) };
    }

    /// Watch a standby whose connect is in progress (wakes the AEH when it completes).
    pub fn add_connecting(&self, fd: c_int) {
        self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLOUT);
    }

    /// The standby is parked: watch for a claim or a close.
    pub fn parked(&self, fd: c_int) {
        self.ctl(libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN | libc::EPOLLRDHUP);
    }

    pub fn remove(&self, fd: c_int) {
        // SAFETY: plain syscall; a missing entry just fails.
        unsafe { libc::epoll_ctl(self.fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    pub fn close(self) {
        drop_owned(&self.fd);
    }
}
