//! TCP hole punching between two GCB programs behind different NATs (the exchange is
//! described in `gcb_proto::tcp_punch`).
//!
//! * The connector's side runs inside the program's `connect()` ([`connect`]): it opens
//!   its *leg* to the broker's relay port from a fresh port with `SO_REUSEADDR`, reads the
//!   broker's offer, connects from the same port to the listener's endpoint and commits
//!   with its proof. If that does not happen within the punch
//!   wait (`GCB_PUNCH_MS`, default [`DEFAULT_PUNCH_WAIT`]), or the peer's NAT answers with a
//!   reset, it writes `RELAY` on the leg and the leg is the program's connection: one
//!   ordinary relayed connection, nothing written to the program's stream yet.
//! * The listener's side runs in the asynchronous event handler ([`ListenerPunch`]): a
//!   standby claimed with a punch claim starts a non-blocking connect from the standby's
//!   own local port (so the NAT mapping is the one the broker observed); the punched
//!   connection is handed to the program when the connector's proof checks, the standby
//!   when the broker passes on `RELAY` (after the usual claim ack). It never waits in the
//!   program's call.
//!
//! Why try the punch first and not race it against the relay: the program must get one
//! connection before it writes a byte, and both sides must end on the same path; a race
//! would have to set up the relay (a standby claim and a splice) on every connection and
//! tear it down on most. The punch costs one round trip between the peers after the
//! offer, and the relay leg is already open when it fails, so a fallback costs the wait
//! and no new handshake; a pair that failed is relayed at once for five minutes (the
//! broker remembers it), so only the first connection pays the wait.

use libc::c_int;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::drop_owned;
use crate::fdtable::{self, ShimFd};
use crate::net;
use gcb_proto::auth::PoolKey;
use gcb_proto::tcp_punch::{self as wire, LegMessage, PunchMsg, MSG_LEN, PROOF_LEN};

use super::standby::{Standby, Watch};

/// How long a punch may take to connect before the relay is used.
pub const DEFAULT_PUNCH_WAIT: Duration = Duration::from_millis(200);
/// How long the connector's leg may take to reach the relay port and send its preamble
/// (as a relayed connect's dial).
const LEG_DIAL_TIMEOUT: Duration = Duration::from_secs(8);
/// How long the connector waits for the broker's offer on its leg.
const OFFER_WAIT: Duration = Duration::from_secs(3);
/// Most listener punches a process runs at once (each holds the standby and the punch
/// socket); claims beyond it are refused and those connections relayed.
pub const MAX_IN_FLIGHT: usize = 64;
/// The longest a listener's punch may stay open (the broker gives up after 5 s).
const LISTENER_DEADLINE: Duration = Duration::from_secs(6);

/// How the connector's punch ended.
pub enum Punched {
    /// The punched connection (blocking mode) and the listener's endpoint.
    Direct(c_int, SocketAddrV4),
    /// The leg, now a relay (blocking mode), and why the punch did not serve.
    Relay(c_int, String),
}

fn reuse_socket(family: c_int, nonblocking: bool) -> Result<c_int, c_int> {
    let ty = libc::SOCK_STREAM | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    let s = net::socket_as(family, ty, false)?;
    // Two sockets of ours share the local port: the leg (or standby) and the punch.
    net::set_sock_opt(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    Ok(s)
}

/// A punch only ever connects to a public address: a broker that was fooled cannot make
/// a shim reach its own host or its LAN (as for `connect_back`, see `net::dial_refusal`).
fn is_public(ip: Ipv4Addr) -> bool {
    !net::never_brokered(ip) && !net::is_private(ip)
}

/// Starts a non-blocking connect from `local` to `peer`.
fn start_punch(family: c_int, local: SocketAddrV4, peer: SocketAddrV4) -> Result<c_int, c_int> {
    let s = reuse_socket(family, true)?;
    let r = net::bind_as(s, local, family).and_then(|()| match net::connect_as(s, peer, family) {
        Ok(()) | Err(libc::EINPROGRESS) => Ok(()),
        Err(e) => Err(e),
    });
    match r {
        Ok(()) => Ok(s),
        Err(e) => {
            net::close(s);
            Err(e)
        }
    }
}

/// Starts the connector's leg to the relay port (non-blocking), from a fresh port of
/// `local_ip` (unspecified: the kernel's choice) in `family`. The connector dials it while
/// its `connect_request` is on its way, so the decision and the leg's handshake overlap.
pub fn dial_leg(family: c_int, local_ip: Ipv4Addr, relay: SocketAddrV4) -> Result<c_int, c_int> {
    let leg = reuse_socket(family, true)?;
    let r = net::bind_as(leg, SocketAddrV4::new(local_ip, 0), family).and_then(|()| {
        match net::connect_as(leg, relay, family) {
            Ok(()) | Err(libc::EINPROGRESS) => Ok(()),
            Err(e) => Err(e),
        }
    });
    match r {
        Ok(()) => Ok(leg),
        Err(e) => {
            net::close(leg);
            Err(e)
        }
    }
}

/// The connector's side, inside `connect()`, on the leg [`dial_leg`] started: `family` is
/// the program socket's, `preamble` the connect id's relay preamble and `bound` its
/// presentation (what the offer is bound to). Err: the leg failed (the caller fails the
/// connect); the leg is closed then.
pub fn connect(
    family: c_int,
    leg: c_int,
    relay: SocketAddrV4,
    preamble: &[u8],
    key: &PoolKey,
    bound: &[u8; 16],
    wait: Duration,
) -> Result<Punched, String> {
    let made = match net::wait_fd(leg, libc::POLLOUT, LEG_DIAL_TIMEOUT) {
        Ok(true) => match net::so_error(leg) {
            0 => Ok(()),
            e => Err(e),
        },
        Ok(false) => Err(libc::ETIMEDOUT),
        Err(e) => Err(e),
    }
    .and_then(|()| net::set_nonblocking(leg, false))
    .and_then(|()| net::write_all(leg, preamble, LEG_DIAL_TIMEOUT));
    if let Err(e) = made {
        net::close(leg);
        return Err(format!("relay {relay}: {}", net::errstr(e)));
    }
    let mut first = [0u8; MSG_LEN];
    if let Err(e) = net::read_exact(leg, &mut first, OFFER_WAIT) {
        net::close(leg);
        return Err(format!(
            "no offer from the relay {relay}: {}",
            net::errstr(e)
        ));
    }
    let offer = match wire::parse_leg(key, bound, &first) {
        Ok(LegMessage::Punch(m)) => m,
        Ok(LegMessage::NoPunch) => {
            return Ok(Punched::Relay(
                leg,
                "the listener has no standby to punch from".into(),
            ))
        }
        Err(e) => {
            net::close(leg);
            return Err(format!("relay {relay}: {e}"));
        }
    };
    match punch_from(family, leg, &offer, key, wait) {
        Ok(direct) => {
            // The commit is written; the broker ends both legs.
            let _ = net::write_all(leg, &[wire::DIRECT], Duration::from_millis(100));
            net::close(leg);
            Ok(Punched::Direct(direct, offer.peer))
        }
        Err(why) => {
            if let Err(e) = net::write_all(leg, &[wire::RELAY], LEG_DIAL_TIMEOUT) {
                net::close(leg);
                return Err(format!("relay {relay}: {}", net::errstr(e)));
            }
            Ok(Punched::Relay(leg, why))
        }
    }
}

/// Connects from the leg's local port to the offer's endpoint and writes our proof;
/// the punched connection in blocking mode, or why not.
fn punch_from(
    family: c_int,
    leg: c_int,
    offer: &PunchMsg,
    key: &PoolKey,
    wait: Duration,
) -> Result<c_int, String> {
    if !is_public(*offer.peer.ip()) {
        return Err(format!("offer names a non-public address {}", offer.peer));
    }
    let local = net::sock_name(leg, false).ok_or("leg has no local address")?;
    let deadline = Instant::now() + wait;
    let s = start_punch(family, local, offer.peer)
        .map_err(|e| format!("punch socket: {}", net::errstr(e)))?;
    let fail = |why: String| {
        net::close(s);
        Err(why)
    };
    let left = deadline.saturating_duration_since(Instant::now());
    match net::wait_fd(s, libc::POLLOUT, left) {
        Ok(true) => {}
        Ok(false) => {
            return fail(format!(
                "no answer from {} in {} ms",
                offer.peer,
                wait.as_millis()
            ))
        }
        Err(e) => return fail(net::errstr(e)),
    }
    match net::so_error(s) {
        0 => {}
        libc::ECONNREFUSED => {
            return fail(format!(
                "{} answered with a reset (its NAT or firewall refuses unknown connections)",
                offer.peer
            ))
        }
        e => return fail(format!("{}: {}", offer.peer, net::errstr(e))),
    }
    let _ = net::set_nonblocking(s, false);
    // The kernel completed a connection with the one endpoint the broker observed for the
    // listener's standby (the offer is MACed): that is the listener's check. Ours to it is
    // the proof, which commits us to this path.
    let mine = wire::proof(key, &offer.nonce);
    if let Err(e) = net::write_all(s, &mine, Duration::from_millis(100)) {
        return fail(format!("{}: {}", offer.peer, net::errstr(e)));
    }
    Ok(s)
}

/// Where a listener's punch stands.
enum Direct {
    /// Connecting (non-blocking).
    Connecting(Arc<ShimFd>),
    /// Connected; `got` bytes of the connector's proof read.
    AwaitingProof(Arc<ShimFd>, [u8; PROOF_LEN], usize),
    /// It failed (or was refused); only the relay can serve now.
    Failed,
}

/// What [`ListenerPunch::poll`] found.
pub enum ListenerProgress {
    /// Nothing final yet.
    Pending,
    /// The connection for the program (blocking, close-on-exec, out of the fd table),
    /// punched or relayed, and the logical peer.
    Done(c_int, SocketAddrV4, &'static str),
    /// It ended without a connection; why.
    Failed(String),
}

/// A listener's punch in progress, run by the AEH.
pub struct ListenerPunch {
    /// The claimed standby (None once it became the program's connection).
    leg: Option<Standby>,
    direct: Direct,
    msg: PunchMsg,
    /// The connector wrote its commit (the broker passed `DIRECT` on).
    committed: bool,
    /// The listener this connection is for (where `hand_over` delivers it).
    pub listen_at: SocketAddrV4,
    deadline: Instant,
}

fn own(fd: c_int) -> Option<Arc<ShimFd>> {
    fdtable::own_fd(fd, "gcb-tcp-punch").ok()
}

/// A plain fd for the program (blocking, close-on-exec), out of the shim's table.
fn release(fd: &Arc<ShimFd>) -> Result<c_int, c_int> {
    let _ = net::set_nonblocking(fd.fd(), false);
    let dup = crate::sys::fcntl_raw(fd.fd(), libc::F_DUPFD_CLOEXEC, 0);
    drop_owned(fd);
    dup
}

impl ListenerPunch {
    /// Starts the punch the verified claim `msg` asks for, from `leg`'s local port (the
    /// standby's, whose NAT mapping the broker saw), in `family`; watched by `watch`.
    pub fn start(
        leg: Standby,
        msg: PunchMsg,
        family: c_int,
        listen_at: SocketAddrV4,
        watch: Option<&Watch>,
    ) -> ListenerPunch {
        let local = net::sock_name(leg.fd(), false);
        let leg = Some(leg);
        let direct = match local.map(|l| start_punch(family, l, msg.peer)) {
            Some(Ok(s)) => match own(s) {
                Some(fd) => {
                    watch.inspect(|w| w.add_connecting(fd.fd()));
                    Direct::Connecting(fd)
                }
                None => {
                    net::close(s);
                    Direct::Failed
                }
            },
            _ => Direct::Failed,
        };
        ListenerPunch {
            leg,
            direct,
            msg,
            committed: false,
            listen_at,
            deadline: Instant::now() + LISTENER_DEADLINE,
        }
    }

    /// When the AEH must look again even without an event.
    pub fn wakeup(&self) -> Instant {
        self.deadline
    }

    /// The leg's and the punched connection's fds (to unwatch when it ends).
    pub fn fds(&self) -> Vec<c_int> {
        let mut v: Vec<c_int> = self.leg.iter().map(|l| l.fd()).collect();
        match &self.direct {
            Direct::Connecting(f) | Direct::AwaitingProof(f, _, _) => v.push(f.fd()),
            Direct::Failed => {}
        }
        v
    }

    fn drop_direct(&mut self) {
        if let Direct::Connecting(f) | Direct::AwaitingProof(f, _, _) =
            std::mem::replace(&mut self.direct, Direct::Failed)
        {
            drop_owned(&f);
        }
    }

    /// A fork child closes its copies (the parent runs the punch).
    pub fn forget_in_child(self) {
        self.close();
    }

    /// Ends it, closing what is left.
    pub fn close(mut self) {
        self.drop_direct();
        if let Some(l) = self.leg.take() {
            l.close();
        }
    }

    /// Advances the punch; a final result consumes the connections it does not return.
    pub fn poll(&mut self, key: &PoolKey, now: Instant, watch: Option<&Watch>) -> ListenerProgress {
        // The broker's word first: RELAY makes the standby the connection.
        let Some(leg_fd) = self.leg.as_ref().map(|l| l.fd()) else {
            return ListenerProgress::Failed("no standby".into());
        };
        let mut b = [0u8; 1];
        match net::recv_peek(leg_fd, &mut b) {
            Ok(1) => {
                let _ = net::recv_some(leg_fd, &mut b);
                match b[0] {
                    wire::RELAY => {
                        self.drop_direct();
                        if net::send_some(leg_fd, &[gcb_proto::preamble::CLAIM_ACK]) != Ok(1) {
                            return ListenerProgress::Failed("claim ack not sent".into());
                        }
                        let Some(leg) = self.leg.take() else {
                            return ListenerProgress::Failed("no standby".into());
                        };
                        watch.inspect(|w| w.remove(leg_fd));
                        return match leg.into_connection() {
                            Ok(fd) => ListenerProgress::Done(fd, self.msg.peer, "relay"),
                            Err(e) => ListenerProgress::Failed(net::errstr(e)),
                        };
                    }
                    wire::DIRECT => self.committed = true,
                    other => {
                        return ListenerProgress::Failed(format!(
                            "broker sent {other:#04x} during a punch"
                        ))
                    }
                }
            }
            Ok(_) if !self.committed => {
                return ListenerProgress::Failed("the broker closed the punch".into())
            }
            Err(e) if e != libc::EAGAIN && !self.committed => {
                return ListenerProgress::Failed(format!(
                    "the broker's connection: {}",
                    net::errstr(e)
                ))
            }
            _ => {}
        }
        if let Direct::Connecting(f) = &self.direct {
            match net::wait_fd(f.fd(), libc::POLLOUT, Duration::ZERO) {
                Ok(false) => {}
                Ok(true) => match net::so_error(f.fd()) {
                    0 => {
                        watch.inspect(|w| w.parked(f.fd()));
                        let f = f.clone();
                        self.direct = Direct::AwaitingProof(f, [0; PROOF_LEN], 0);
                    }
                    e => {
                        crate::debug!("punch to {}: {}", self.msg.peer, net::errstr(e));
                        self.drop_direct();
                    }
                },
                Err(_) => self.drop_direct(),
            }
        }
        if let Direct::AwaitingProof(f, buf, got) = &mut self.direct {
            // Exactly the proof: what follows is the program's data.
            match net::recv_some(f.fd(), &mut buf[*got..]) {
                Ok(0) => self.drop_direct(),
                Ok(n) => {
                    *got += n;
                    if *got == PROOF_LEN {
                        if wire::check_proof(key, &self.msg.nonce, &buf[..]) {
                            let f = f.clone();
                            self.direct = Direct::Failed;
                            let r = release(&f);
                            return match r {
                                Ok(fd) => ListenerProgress::Done(fd, self.msg.peer, "punched"),
                                Err(e) => ListenerProgress::Failed(net::errstr(e)),
                            };
                        }
                        crate::warn!(
                            "refused a punched connection from {}: wrong proof (not the peer the broker paired)",
                            self.msg.peer
                        );
                        self.drop_direct();
                    }
                }
                Err(libc::EAGAIN) => {}
                Err(_) => self.drop_direct(),
            }
        }
        if matches!(self.direct, Direct::Failed) && self.committed {
            return ListenerProgress::Failed(
                "the connector committed to a connection we do not have".into(),
            );
        }
        if now >= self.deadline {
            return ListenerProgress::Failed("no verdict in time".into());
        }
        ListenerProgress::Pending
    }
}

/// Checks a punch claim read from a standby: the MAC (broker, pool key, this standby's
/// key), a nonce not used before, and a public target. The claim, or why not.
pub fn check_claim(
    key: Option<&PoolKey>,
    standby_key: &[u8; 16],
    raw: &[u8],
    nonces: &mut wire::NonceLog,
) -> Result<PunchMsg, String> {
    let key = key.ok_or("a punch claim without a pool key")?;
    let msg = wire::parse(key, wire::Kind::Claim, standby_key, raw).map_err(|e| e.to_string())?;
    if !is_public(*msg.peer.ip()) {
        return Err(format!(
            "punch claim names a non-public address {}",
            msg.peer
        ));
    }
    if !nonces.first_use(&msg.nonce) {
        return Err("replayed punch claim (nonce already used)".into());
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gcb_proto::tcp_punch::{encode, Kind, NonceLog};

    fn key() -> PoolKey {
        PoolKey::from_file_contents(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn claim(peer: &str, nonce: u8) -> [u8; MSG_LEN] {
        let m = PunchMsg {
            kind: Kind::Claim,
            peer: peer.parse().unwrap(),
            nonce: [nonce; 16],
        };
        encode(&key(), &m, &[9; 16])
    }

    #[test]
    fn a_claim_is_taken_once_from_the_broker_for_a_public_peer() {
        let mut log = NonceLog::new();
        let k = key();
        let raw = claim("203.0.113.2:40000", 1);
        let m = check_claim(Some(&k), &[9; 16], &raw, &mut log).unwrap();
        assert_eq!(m.peer, "203.0.113.2:40000".parse().unwrap());
        // Replayed: refused.
        let again = check_claim(Some(&k), &[9; 16], &raw, &mut log).unwrap_err();
        assert!(again.contains("replayed"), "{again}");
        // Forged (another key), or meant for another standby: refused.
        let other = PoolKey::from_file_contents(b"another key of 32 bytes.........").unwrap();
        assert!(check_claim(Some(&other), &[9; 16], &claim("203.0.113.2:1", 2), &mut log).is_err());
        assert!(check_claim(Some(&k), &[8; 16], &claim("203.0.113.2:1", 3), &mut log).is_err());
        // Without a pool key nothing is taken.
        assert!(check_claim(None, &[9; 16], &claim("203.0.113.2:1", 4), &mut log).is_err());
        // The LAN, loopback: never a punch target.
        for lan in [
            "10.1.0.12:22",
            "127.0.0.1:22",
            "192.168.1.1:80",
            "169.254.1.1:80",
        ] {
            let why = check_claim(Some(&k), &[9; 16], &claim(lan, 5), &mut log).unwrap_err();
            assert!(why.contains("non-public"), "{lan}: {why}");
        }
    }
}
