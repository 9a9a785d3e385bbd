//! # gcb-ops: what the libgcb daemons share for their operators
//!
//! Shared by `gcb-brokerd` and `gcb-portfwd` (it lives beside the broker, which had it
//! first). The operator's sockets, served inside the event loop: the admin unix socket
//! (`--admin-socket`, answers `status`) and the Prometheus endpoint (`--metrics`, answers
//! `GET /metrics`). Both are one request, one answer, close:
//!
//! * a connection's request is read up to [`MAX_ADMIN_REQUEST`] /
//!   [`MAX_HTTP_REQUEST`] bytes (more is answered with an error and closed);
//! * the answer is written without blocking from a buffer, as the socket drains;
//! * a peer that has not finished within [`PEER_TIMEOUT`] is closed, and at most
//!   [`MAX_CONNS`] are served at once (more are closed at accept), so a slow or
//!   hostile peer costs the loop nothing.
//!
//! Served from the loop rather than a thread: the state the answers describe lives in the
//! loop, so an answer is built from it directly (no lock, no copy published each turn,
//! and a scrape costs nothing until it happens).
//!
//! The admin socket is created mode 0600 (owned by the daemon's user) in a directory
//! created if missing, and the peer's credentials are checked too (`SO_PEERCRED`: root or
//! the daemon's own uid). A socket file left by a crashed daemon (nothing answers) is
//! replaced; one that a live daemon answers on is an error ([`OpsError::InUse`]). The file
//! is removed when the daemon exits.
//!
//! A daemon keeps its [`Ops`] in an [`OpsSlot`] (empty until opened) and answers a
//! [`Request`] from its status document with [`answer`].
//!
//! ## What else the daemons share
//!
//! * [`admin_path`]: where the admin socket is (the default path, `--admin-socket` as
//!   given);
//! * [`status_doc`]: the fields every status document starts with (daemon, version,
//!   pid, uptime, control address);
//! * [`status_client`]: the `status` command (`gcb-brokerd status`, `gcb-portfwd status`):
//!   asks the admin socket, prints the JSON or the daemon's tables;
//! * [`status_tables`]: durations, aligned tables and the counters block of those tables;
//! * [`metrics_registry`]: a daemon's table of series (stats name -> `gcb_*` metric) made
//!   into Prometheus families and encoded with `prometheus-client`;
//! * [`counter_list`]: the counter list as the stats log line and as the status document's
//!   `counters`;
//! * [`logging`]: the log line (timestamp or journald priority, daemon name, level), the
//!   level changed at run time;
//! * [`lifecycle`]: the signal handlers' flags, why a loop run ended, a reload's log line;
//! * [`keyfile`]: reading (with the permission warning) and generating the pool key file.
//!
//! Floors: each module uses only modules on its own floor or below, with no cycle;
//! `scripts/modgraph --check brokerd/ops/src` checks the list:
//!
//! - **Floor 0, helpers**: `admin_path`, `status_tables`, `metrics_registry`, `counter_list`, `logging`, `lifecycle`, `keyfile` (independent)
//! - **Floor 1, the status document and command**: `status_doc`, `status_client`
//!
//! The crate root (the sockets) is above them all.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

pub mod admin_path;
pub mod counter_list;
pub mod keyfile;
pub mod lifecycle;
pub mod logging;
pub mod metrics_registry;
pub mod status_client;
pub mod status_doc;
pub mod status_tables;

pub use admin_path::{admin_socket_arg, default_admin_socket};

/// Poll tokens from here up belong to the operator's sockets (the daemon's own tokens
/// count up from 0 and never get near).
pub const TOKEN_BASE: usize = 1 << 62;
const ADMIN_LISTENER: Token = Token(TOKEN_BASE);
const METRICS_LISTENER: Token = Token(TOKEN_BASE + 1);
const FIRST_CONN: usize = TOKEN_BASE + 2;

/// Longest admin request line (`status\n` and room to grow).
pub const MAX_ADMIN_REQUEST: usize = 256;
/// Longest HTTP request (request line and headers).
pub const MAX_HTTP_REQUEST: usize = 8192;
/// A connection that has not sent its request and taken its answer by then is closed.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNS: usize = 64;

/// What a peer asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `status` on the admin socket: the status document (JSON).
    Status,
    /// `GET /metrics` on the metrics listener: the Prometheus text.
    Metrics,
}

/// The answer to `req`: the status document `doc` as one line of JSON, or the metrics
/// text that `metrics` makes of it.
pub fn answer<T: serde::Serialize>(
    req: Request,
    doc: &T,
    metrics: impl FnOnce(&T) -> String,
) -> Vec<u8> {
    match req {
        Request::Status => {
            let mut out = serde_json::to_vec(doc).unwrap_or_default();
            out.push(b'\n');
            out
        }
        Request::Metrics => metrics(doc).into_bytes(),
    }
}

/// Why the operator's sockets could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A live daemon answers on the admin socket.
    #[error("admin socket {0}: another daemon is answering on it (stop it, or give --admin-socket another path, or none)")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("admin socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// A socket could not be set up.
    #[error("{what} {where_}: {source}")]
    Io {
        /// Which socket.
        what: &'static str,
        /// Its address or path.
        where_: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
}

struct Conn {
    stream: Stream,
    http: bool,
    request: Vec<u8>,
    /// The answer once known, and how much of it is written.
    out: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// The admin socket and the metrics listener, and their connections.
pub struct Ops {
    admin: Option<(UnixListener, PathBuf)>,
    metrics: Option<TcpListener>,
    conns: HashMap<Token, Conn>,
    next: usize,
}

/// A daemon's operator sockets: none until [`OpsSlot::open`].
#[derive(Default)]
pub struct OpsSlot(Option<Ops>);

impl OpsSlot {
    /// Opens the admin socket at `admin` and the metrics listener on `metrics` (either
    /// optional; [`Ops::open`]), served from the event loop from now on.
    pub fn open(
        &mut self,
        admin: Option<&Path>,
        metrics: Option<SocketAddr>,
        registry: &Registry,
    ) -> Result<(), OpsError> {
        self.0 = Some(Ops::open(admin, metrics, registry)?);
        Ok(())
    }

    /// The operator's sockets, if opened.
    pub fn get(&self) -> Option<&Ops> {
        self.0.as_ref()
    }

    /// Takes the sockets out (to serve an event with an `answer` that borrows the daemon:
    /// [`Ops::ready`]); [`OpsSlot::put`] puts them back.
    pub fn take(&mut self) -> Option<Ops> {
        self.0.take()
    }

    /// Puts back what [`OpsSlot::take`] took.
    pub fn put(&mut self, ops: Option<Ops>) {
        self.0 = ops;
    }

    /// Closes connections past their deadline ([`Ops::sweep`]).
    pub fn sweep(&mut self, registry: &Registry, now: Instant) {
        if let Some(ops) = self.0.as_mut() {
            ops.sweep(registry, now);
        }
    }

    /// The earliest connection deadline ([`Ops::next_deadline`]).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.0.as_ref().and_then(Ops::next_deadline)
    }
}

fn io_err(what: &'static str, where_: impl ToString) -> impl FnOnce(io::Error) -> OpsError {
    let where_ = where_.to_string();
    move |source| OpsError::Io {
        what,
        where_,
        source,
    }
}

/// Binds the admin socket at `path`: directory created if missing, a stale socket file
/// replaced, mode 0600.
fn bind_admin(path: &Path) -> Result<UnixListener, OpsError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_err("admin socket directory", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(OpsError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(OpsError::InUse(path.to_owned()));
        }
        // Nothing answers: left by a daemon that died without cleaning up.
        std::fs::remove_file(path).map_err(io_err("admin socket", &shown))?;
    }
    // The socket is created 0600 from the start (no window in which others may connect):
    // the umask is process-wide, and this runs at startup, before any other thread.
    // SAFETY: umask has no preconditions; the old mask is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound.map_err(io_err("admin socket", shown))
}

/// The uid of a unix socket's peer (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid ucred of `len` bytes for the kernel to fill in; the fd is
    // an open socket owned by `s`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

impl Ops {
    /// Opens the admin socket at `admin` and the metrics listener on `metrics` (each
    /// optional) and registers them with `registry`.
    pub fn open(
        admin: Option<&Path>,
        metrics: Option<SocketAddr>,
        registry: &Registry,
    ) -> Result<Ops, OpsError> {
        let mut ops = Ops {
            admin: None,
            metrics: None,
            conns: HashMap::new(),
            next: FIRST_CONN,
        };
        if let Some(path) = admin {
            let mut l = bind_admin(path)?;
            // From here on, Drop removes the file.
            let reg = registry.register(&mut l, ADMIN_LISTENER, Interest::READABLE);
            ops.admin = Some((l, path.to_owned()));
            reg.map_err(io_err("admin socket", path.display()))?;
        }
        if let Some(addr) = metrics {
            let mut l = TcpListener::bind(addr).map_err(io_err("metrics listener", addr))?;
            registry
                .register(&mut l, METRICS_LISTENER, Interest::READABLE)
                .map_err(io_err("metrics listener", addr))?;
            ops.metrics = Some(l);
        }
        Ok(ops)
    }

    /// The admin socket's path, if open.
    pub fn admin_path(&self) -> Option<&Path> {
        self.admin.as_ref().map(|(_, p)| p.as_path())
    }

    /// The metrics listener's address, if open.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Whether `token` is one of ours.
    pub fn owns(token: Token) -> bool {
        token.0 >= TOKEN_BASE
    }

    /// Serves a readiness event of one of our tokens; `answer` builds the answer to a
    /// request (only called once a complete request has arrived).
    pub fn ready(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        answer: &mut dyn FnMut(Request) -> Vec<u8>,
    ) {
        match token {
            ADMIN_LISTENER => self.accept(registry, now, false),
            METRICS_LISTENER => self.accept(registry, now, true),
            t => self.serve(t, registry, answer),
        }
    }

    /// Closes connections past their deadline.
    pub fn sweep(&mut self, registry: &Registry, now: Instant) {
        let late: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.close(t, registry);
        }
    }

    /// The earliest connection deadline (the loop must wake by then).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.deadline).min()
    }

    fn accept(&mut self, registry: &Registry, now: Instant, http: bool) {
        loop {
            let accepted = if http {
                match &self.metrics {
                    Some(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                    None => return,
                }
            } else {
                match &self.admin {
                    Some((l, _)) => l.accept().map(|(s, _)| Stream::Unix(s)),
                    None => return,
                }
            };
            let mut stream = match accepted {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("operator socket accept: {e}");
                    return;
                }
            };
            if let Stream::Unix(s) = &stream {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let me = unsafe { libc::geteuid() };
                if !matches!(peer_uid(s), Some(u) if u == 0 || u == me) {
                    continue; // dropped: closes it
                }
            }
            if self.conns.len() >= MAX_CONNS {
                continue;
            }
            let t = Token(self.next);
            self.next += 1;
            if registry
                .register(stream.source(), t, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                t,
                Conn {
                    stream,
                    http,
                    request: Vec::new(),
                    out: None,
                    deadline: now + PEER_TIMEOUT,
                },
            );
            // Served at its first event: mio reports a new registration's readiness
            // (it is writable at once), so a request already there is not missed.
        }
    }

    fn serve(&mut self, t: Token, registry: &Registry, answer: &mut dyn FnMut(Request) -> Vec<u8>) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if c.out.is_none() {
            let max = if c.http {
                MAX_HTTP_REQUEST
            } else {
                MAX_ADMIN_REQUEST
            };
            let mut buf = [0u8; 1024];
            let mut eof = false;
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        c.request.extend_from_slice(&buf[..n]);
                        if c.request.len() > max {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        eof = true;
                        break;
                    }
                }
            }
            let out = if c.request.len() > max {
                Some(if c.http {
                    http_response(431, "text/plain", b"request too large\n".to_vec())
                } else {
                    b"error: request too long\n".to_vec()
                })
            } else if c.http {
                parse_http(&c.request).map(|r| match r {
                    Ok(req) => http_response(
                        200,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        answer(req),
                    ),
                    Err(code) => http_response(code, "text/plain", b"not found\n".to_vec()),
                })
            } else {
                match c.request.iter().position(|b| *b == b'\n') {
                    Some(end) => Some(match trim(&c.request[..end]) {
                        b"status" => answer(Request::Status),
                        _ => {
                            b"error: unknown request (the admin socket answers: status)\n".to_vec()
                        }
                    }),
                    None => None,
                }
            };
            match out {
                Some(o) => c.out = Some((o, 0)),
                None if eof => return self.close(t, registry),
                None => return,
            }
        }
        if let Some((out, sent)) = c.out.as_mut() {
            while *sent < out.len() {
                match c.stream.write(&out[*sent..]) {
                    Ok(0) => break,
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => break,
                }
            }
            self.close(t, registry);
        }
    }

    fn close(&mut self, t: Token, registry: &Registry) {
        if let Some(mut c) = self.conns.remove(&t) {
            let _ = registry.deregister(c.stream.source());
        }
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.admin {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let s = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let e = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(s, |e| e + 1);
    &b[s..e.max(s)]
}

/// A complete HTTP request (headers ended): `GET /metrics` (a query string is ignored),
/// else the status to answer. None: not complete yet.
fn parse_http(req: &[u8]) -> Option<Result<Request, u16>> {
    let end = req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| req.windows(2).position(|w| w == b"\n\n"))?;
    let head = String::from_utf8_lossy(&req[..end]);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Some(Err(400));
    }
    if method != Some("GET") {
        return Some(Err(405));
    }
    let path = target.unwrap_or("").split('?').next().unwrap_or("");
    Some(if path == "/metrics" {
        Ok(Request::Metrics)
    } else {
        Err(404)
    })
}

fn http_response(code: u16, content_type: &str, body: Vec<u8>) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests() {
        assert_eq!(parse_http(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parse_http(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Ok(Request::Metrics))
        );
        assert_eq!(
            parse_http(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Ok(Request::Metrics))
        );
        assert_eq!(parse_http(b"GET / HTTP/1.1\r\n\r\n"), Some(Err(404)));
        assert_eq!(
            parse_http(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Err(405))
        );
        assert_eq!(parse_http(b"GET /metrics\r\n\r\n"), Some(Err(400)));
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("gcb-ops-test-{}", std::process::id()));
        let path = dir.join("sub").join("d.sock");
        let poll = mio::Poll::new().unwrap();
        {
            // A socket file nobody answers on (its listener is gone).
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
            drop(l);
        }
        let ops = Ops::open(Some(&path), None, poll.registry()).expect("stale replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let poll2 = mio::Poll::new().unwrap();
        match Ops::open(Some(&path), None, poll2.registry()) {
            Err(OpsError::InUse(p)) => assert_eq!(p, path),
            other => panic!("expected InUse, got {:?}", other.err()),
        }
        drop(ops);
        assert!(!path.exists(), "removed at exit");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
