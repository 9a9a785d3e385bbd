//! Zero-copy TCP relay: two sockets spliced through a pipe per direction.
//!
//! Each direction moves bytes `source -> pipe -> sink` with splice(2)
//! (`SPLICE_F_NONBLOCK | SPLICE_F_MOVE`), so payload never enters user
//! space. The event loop calls [`Relay::pump`] on every readiness event of
//! either socket; `pump` runs both directions until neither can progress
//! (every blocked step ended in `EAGAIN`, which is what mio's edge-triggered
//! readiness needs).
//!
//! The pipe is only refilled when empty, so an `EAGAIN` from the source
//! always means "no data" and never "pipe full".
//!
//! Close semantics:
//! * EOF from a source: the pipe is drained to the sink, then the sink gets
//!   `shutdown(SHUT_WR)` (half-close propagates); the other direction keeps
//!   flowing.
//! * When both directions have seen EOF and been drained, the relay is done.
//! * A hard error (reset, EPIPE) on either socket aborts the relay: both
//!   sockets are closed with `SO_LINGER = 0`, so the peer sees a reset too.
//! * Crash visibility: both sockets carry `SO_LINGER {on, 0}` for as long as
//!   the relay runs, so if the broker dies (kill -9, OOM) the kernel resets
//!   both connections and each end sees an error, not a clean end of stream
//!   after a truncated transfer. Only a relay that finished cleanly (both
//!   directions at EOF, drained and half-closed) gets the normal linger back
//!   before it is closed, so its last bytes are delivered.
//! * Idle: [`Relay::last_moved`] is when a byte last moved either way; the
//!   event loop aborts relays idle longer than `--relay-idle-secs`.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

/// Bytes requested per splice (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// A non-blocking pipe used as the in-kernel buffer of one direction.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2
        // requires; on success both entries are fresh fds that we own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { r, w })
    }
}

/// splice(2) between two fds, one of which is a pipe.
fn splice(fd_in: RawFd, fd_out: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (the caller
    // borrows the owning objects); null offsets are allowed for pipes and
    // sockets; splice does not touch user memory.
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// State of one direction.
#[derive(Debug)]
struct Direction {
    pipe: Pipe,
    in_pipe: usize,
    eof: bool,
    shut: bool,
    bytes: u64,
}

/// What went wrong in a direction.
#[derive(Debug)]
enum DirError {
    Source(io::Error),
    Sink(io::Error),
}

impl Direction {
    fn new() -> io::Result<Direction> {
        Ok(Direction {
            pipe: Pipe::new()?,
            in_pipe: 0,
            eof: false,
            shut: false,
            bytes: 0,
        })
    }

    /// Moves bytes until blocked. Returns whether anything happened.
    fn pump(&mut self, src: &TcpStream, dst: &TcpStream) -> Result<bool, DirError> {
        let mut progress = false;
        loop {
            if self.in_pipe > 0 {
                match splice(self.pipe.r.as_raw_fd(), dst.as_raw_fd(), self.in_pipe) {
                    Ok(0) => return Err(DirError::Sink(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.bytes += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(DirError::Sink(e)),
                }
            } else if self.eof {
                if !self.shut {
                    self.shut = true;
                    progress = true;
                    match dst.shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        // The peer may already be gone; the other direction
                        // reports that if it matters.
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Err(DirError::Sink(e)),
                    }
                }
                return Ok(progress);
            } else {
                match splice(src.as_raw_fd(), self.pipe.w.as_raw_fd(), CHUNK) {
                    Ok(0) => {
                        self.eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        self.in_pipe = n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(DirError::Source(e)),
                }
            }
        }
    }
}

/// Outcome of [`Relay::pump`].
#[derive(Debug, PartialEq, Eq)]
pub enum RelayState {
    /// Still moving bytes; wait for the next event.
    Open,
    /// Both directions finished cleanly; drop the relay.
    Done,
    /// A socket failed; the relay reset both sides. Drop it.
    Reset(String),
}

/// Two spliced TCP connections.
#[derive(Debug)]
pub struct Relay {
    a: TcpStream,
    b: TcpStream,
    ab: Direction,
    ba: Direction,
    last_moved: Instant,
}

impl Relay {
    /// Pairs two connected, non-blocking streams.
    ///
    /// Sets `TCP_NODELAY` (the relay must not add Nagle delays to what the
    /// endpoints send) and TCP keepalive (60 s idle, 10 s x 6 probes), so a
    /// peer that vanished without FIN or RST does not pin the relay forever,
    /// and `SO_LINGER {on, 0}` (see module docs: a dying broker resets both).
    /// `now` starts the idle clock ([`Relay::last_moved`]).
    pub fn new(a: TcpStream, b: TcpStream, now: Instant) -> io::Result<Relay> {
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        for s in [&a, &b] {
            let r = socket2::SockRef::from(s);
            r.set_nodelay(true)?;
            r.set_tcp_keepalive(&ka)?;
            r.set_linger(Some(Duration::ZERO))?;
        }
        Ok(Relay {
            a,
            b,
            ab: Direction::new()?,
            ba: Direction::new()?,
            last_moved: now,
        })
    }

    /// The first stream (for registration with the poller).
    pub fn a_mut(&mut self) -> &mut TcpStream {
        &mut self.a
    }

    /// The second stream.
    pub fn b_mut(&mut self) -> &mut TcpStream {
        &mut self.b
    }

    /// The peers of the two streams (for `status`).
    pub fn peers(&self) -> (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>) {
        (self.a.peer_addr().ok(), self.b.peer_addr().ok())
    }

    /// Bytes moved `(a -> b, b -> a)`.
    pub fn bytes(&self) -> (u64, u64) {
        (self.ab.bytes, self.ba.bytes)
    }

    /// When a byte last moved (or a direction ended), either way.
    pub fn last_moved(&self) -> Instant {
        self.last_moved
    }

    /// Moves bytes in both directions until neither can progress; if any moved,
    /// `now` is when they last did.
    pub fn pump(&mut self, now: Instant) -> RelayState {
        loop {
            let r1 = self.ab.pump(&self.a, &self.b);
            let r2 = self.ba.pump(&self.b, &self.a);
            match (r1, r2) {
                (Ok(p1), Ok(p2)) => {
                    if p1 || p2 {
                        self.last_moved = now;
                    }
                    if self.ab.shut && self.ba.shut {
                        // Clean end: everything is in the kernel's send buffers;
                        // a normal close delivers it (linger 0 would cut it).
                        for s in [&self.a, &self.b] {
                            let _ = socket2::SockRef::from(s).set_linger(None);
                        }
                        return RelayState::Done;
                    }
                    if !p1 && !p2 {
                        return RelayState::Open;
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    self.abort();
                    return RelayState::Reset(match e {
                        DirError::Source(e) => format!("read: {e}"),
                        DirError::Sink(e) => format!("write: {e}"),
                    });
                }
            }
        }
    }

    /// Makes both sockets send RST when dropped.
    pub fn abort(&mut self) {
        for s in [&self.a, &self.b] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdStream};

    /// Returns (client side kept by the test, server side given to the relay).
    fn pair() -> (StdStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = StdStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, TcpStream::from_std(s))
    }

    /// Drives the relay by polling (no event loop) until `done` holds.
    fn drive(r: &mut Relay, mut done: impl FnMut() -> bool) -> RelayState {
        for _ in 0..20_000 {
            let st = r.pump(Instant::now());
            if st != RelayState::Open || done() {
                return st;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        panic!("relay made no progress");
    }

    #[test]
    fn bytes_and_half_close() {
        let (mut x, xs) = pair();
        let (mut y, ys) = pair();
        let mut r = Relay::new(xs, ys, Instant::now()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let d2 = data.clone();
        // x writes everything then half-closes; y reads all, then answers.
        let tx = std::thread::spawn(move || {
            x.write_all(&d2).unwrap();
            x.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            x.read_to_end(&mut back).unwrap();
            back
        });
        let ty = std::thread::spawn(move || {
            let mut got = Vec::new();
            y.read_to_end(&mut got).unwrap();
            y.write_all(b"thanks").unwrap();
            y.shutdown(Shutdown::Write).unwrap();
            got
        });
        // While running, a dying broker would reset both ends.
        for s in [&r.a, &r.b] {
            assert_eq!(
                socket2::SockRef::from(s).linger().unwrap(),
                Some(Duration::ZERO)
            );
        }
        let before = r.last_moved();
        let st = drive(&mut r, || false);
        assert_eq!(st, RelayState::Done);
        assert!(r.last_moved() > before);
        // A clean end closes normally, delivering what is still buffered.
        for s in [&r.a, &r.b] {
            assert_eq!(socket2::SockRef::from(s).linger().unwrap(), None);
        }
        assert_eq!(ty.join().unwrap(), data);
        assert_eq!(tx.join().unwrap(), b"thanks");
        assert_eq!(r.bytes(), (300_000, 6));
    }

    /// The broker process dying mid-transfer (here: the relay dropped without a clean
    /// end, as the kernel does for a killed process) resets the receiver: no clean EOF.
    #[test]
    fn relay_dropped_mid_transfer_resets_both_ends() {
        let (mut x, xs) = pair();
        let (mut y, ys) = pair();
        let mut r = Relay::new(xs, ys, Instant::now()).unwrap();
        x.write_all(&[7u8; 10_000]).unwrap();
        let mut got = vec![0u8; 10_000];
        for _ in 0..2000 {
            assert_eq!(r.pump(Instant::now()), RelayState::Open);
            if r.bytes().0 == 10_000 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        y.read_exact(&mut got).unwrap();
        drop(r); // what exit does to the broker's fds
        let mut buf = [0u8; 16];
        let e = y.read(&mut buf);
        assert!(
            matches!(&e, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{e:?}"
        );
        let e = x.read(&mut buf);
        assert!(
            matches!(&e, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{e:?}"
        );
    }

    #[test]
    fn reset_propagates() {
        let (x, xs) = pair();
        let (mut y, ys) = pair();
        let mut r = Relay::new(xs, ys, Instant::now()).unwrap();
        socket2::SockRef::from(&x)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(x); // RST towards the relay
        let st = drive(&mut r, || false);
        assert!(matches!(st, RelayState::Reset(_)), "{st:?}");
        drop(r);
        let mut buf = [0u8; 16];
        let e = y.read(&mut buf);
        assert!(
            matches!(&e, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{e:?}"
        );
    }
}
