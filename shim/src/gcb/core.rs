//! [`GcbLayer`]: the GCB client behind its fork-safe lock, and the two ways the
//! asynchronous event handler (AEH) is entered: [`GcbLayer::pump`] (run it now) and
//! `aeh` (what a wait must watch). The layer's features add their own `impl GcbLayer`
//! blocks in [`super::tcp`], [`super::wait`], [`super::udp`] and [`super::udp_epoll`];
//! [`super`] implements the [`crate::layer::Layer`] trait by dispatching to them.

use libc::c_int;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use super::client::Client;
use crate::fdtable::FdEntry;
use crate::forklock::ForkMutex;
use crate::net;
use crate::sockstate::GcbSock;

/// Default broker control port (UDP; the relay is TCP on the same port).
pub const DEFAULT_BROKER_PORT: u16 = 9650;

/// The GCB client layer.
pub struct GcbLayer {
    pub(super) client: ForkMutex<Client>,
}

/// Parses one broker address (`IP[:PORT]`, IPv4 only for now).
pub fn parse_broker(s: &str) -> Result<SocketAddrV4, gcb_proto::addr::AddrError> {
    gcb_proto::addr::parse_endpoint_v4(s, DEFAULT_BROKER_PORT)
}

/// `GCB_BROKER` read as a pool: the brokers, and what was wrong with the entries left
/// out (to be said once).
pub struct PoolSetting {
    pub brokers: Vec<SocketAddrV4>,
    pub problems: Vec<String>,
}

/// Parses `GCB_BROKER`: `IP[:PORT],IP[:PORT],...` ([`gcb_proto::pool::parse_list`]), or one
/// DNS name (`NAME[:PORT]`) whose A records are the pool, resolved now with the real
/// libc's getaddrinfo (at initialisation, with the re-entrancy guard set, so its own
/// sockets are not ours). Err when no usable broker is left.
pub fn parse_pool(s: &str) -> Result<PoolSetting, String> {
    if let Some((host, port)) = gcb_proto::pool::looks_like_name(s) {
        let port = match port.map(str::parse::<u16>) {
            None => DEFAULT_BROKER_PORT,
            Some(Ok(p)) if p != 0 => p,
            Some(_) => return Err(format!("{s:?}: the port is not 1 to 65535")),
        };
        let ips = resolve_cached(host).map_err(|e| format!("{s:?}: cannot resolve {host}: {e}"))?;
        if ips.is_empty() {
            return Err(format!("{s:?}: {host} has no IPv4 address"));
        }
        let brokers = ips
            .into_iter()
            .map(|ip| SocketAddrV4::new(ip, port))
            .collect();
        return Ok(PoolSetting {
            brokers,
            problems: Vec::new(),
        });
    }
    let l = gcb_proto::pool::parse_list(s, DEFAULT_BROKER_PORT);
    let mut problems: Vec<String> = l.bad.iter().map(|e| e.to_string()).collect();
    problems.extend(l.same_ip.iter().map(|a| {
        format!("{a}: another broker of the list has this IP (a proxy names its broker by IP)")
    }));
    if l.brokers.is_empty() {
        return Err(problems
            .first()
            .cloned()
            .unwrap_or_else(|| "empty broker list".to_owned()));
    }
    Ok(PoolSetting {
        brokers: l.brokers,
        problems,
    })
}

/// Where a process leaves the answer for the pool's DNS name to the processes it starts
/// (`NAME=IP,IP` or `NAME=!why`): a process tree resolves once (a shell script that runs
/// dozens of programs must not pay the lookup in each).
const RESOLVED_ENV: &std::ffi::CStr = c"GCB_BROKER_RESOLVED";

/// [`resolve_v4`], or the answer an ancestor process left in [`RESOLVED_ENV`] for `host`.
fn resolve_cached(host: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    // SAFETY: the name is NUL-terminated; the value is copied out at once (initialisation
    // runs before the program's threads).
    let p = unsafe { libc::getenv(RESOLVED_ENV.as_ptr()) };
    if !p.is_null() {
        // SAFETY: a non-null getenv result is a NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned();
        if let Some(ans) = v.strip_prefix(host).and_then(|r| r.strip_prefix('=')) {
            if let Some(why) = ans.strip_prefix('!') {
                return Err(why.to_owned());
            }
            let ips: Vec<_> = ans.split(',').filter_map(|a| a.parse().ok()).collect();
            if !ips.is_empty() {
                return Ok(ips);
            }
        }
    }
    // Set before the lookup thread starts (and after it ended), never while it runs: a
    // lookup that does not finish in time leaves "no answer" for the children.
    set_resolved(host, &format!("!no answer within {RESOLVE_WAIT:?}"));
    let (answer, done) = resolve_v4(host);
    if done {
        let v = match &answer {
            Ok(ips) => ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            Err(why) => format!("!{why}"),
        };
        set_resolved(host, &v);
    }
    answer
}

/// Leaves `host`'s answer `v` in [`RESOLVED_ENV`] (see [`resolve_cached`]).
fn set_resolved(host: &str, v: &str) {
    if let Ok(c) = std::ffi::CString::new(format!("{host}={v}")) {
        // SAFETY: both strings are NUL-terminated; initialisation runs before the program's
        // threads, and no lookup thread of ours runs now (see the caller), so nothing
        // reads the environment meanwhile.
        unsafe { libc::setenv(RESOLVED_ENV.as_ptr(), c.as_ptr(), 1) };
    }
}

/// How long the program's start waits for the pool's DNS name: a resolver that does not
/// answer (a host without DNS) would otherwise hold it for its whole retry schedule.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

/// The IPv4 addresses of `host`, waiting at most [`RESOLVE_WAIT`]: the lookup runs on a
/// thread of its own (with the re-entrancy guard set, so its sockets are not ours), which
/// is left to finish alone if it takes longer. Also says whether the lookup finished.
fn resolve_v4(host: &str) -> (Result<Vec<std::net::Ipv4Addr>, String>, bool) {
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_owned();
    let spawned = std::thread::Builder::new()
        .name("gcb-resolve".into())
        .spawn(move || {
            let _guard = crate::guard::Guard::enter();
            let _ = tx.send(getaddrinfo_v4(&name));
        });
    let Ok(thread) = spawned else {
        return (Err("no thread for the lookup".to_owned()), false);
    };
    match rx.recv_timeout(RESOLVE_WAIT) {
        Ok(answer) => {
            let _ = thread.join();
            (answer, true)
        }
        Err(_) => (Err(format!("no answer within {RESOLVE_WAIT:?}")), false),
    }
}

/// The IPv4 addresses of `host` (getaddrinfo, AF_INET), sorted, without duplicates.
fn getaddrinfo_v4(host: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let c = std::ffi::CString::new(host).map_err(|_| "a NUL in the name".to_owned())?;
    // SAFETY: a zeroed addrinfo is a valid "no hints" value; we set family and type.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_INET;
    hints.ai_socktype = libc::SOCK_DGRAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: c is NUL-terminated, hints and res are valid; freed below.
    let rc = unsafe { libc::getaddrinfo(c.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string.
        let why = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(rc)) };
        return Err(why.to_string_lossy().into_owned());
    }
    let mut ips = Vec::new();
    let mut p = res;
    while !p.is_null() {
        // SAFETY: p is a node of the list getaddrinfo returned, not yet freed.
        let ai = unsafe { &*p };
        if ai.ai_family == libc::AF_INET && !ai.ai_addr.is_null() {
            // SAFETY: an AF_INET entry's address is a sockaddr_in.
            let sin = unsafe { &*(ai.ai_addr as *const libc::sockaddr_in) };
            ips.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        p = ai.ai_next;
    }
    // SAFETY: res came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// What names this host in a listener's pool identity: `/etc/machine-id`, else the host
/// name (see [`gcb_proto::pool`]).
pub fn host_id() -> Vec<u8> {
    if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
        let id = id.trim();
        if !id.is_empty() {
            return id.as_bytes().to_vec();
        }
    }
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        return buf[..n].to_vec();
    }
    Vec::new()
}

/// A GCB TCP socket's addresses, if it is one.
pub(super) fn gcb_state(entry: &FdEntry) -> Option<GcbSock> {
    entry.with_state(|s| s.gcb()).flatten()
}

/// A program-side deadline from a poll-style timeout (ms, -1 infinite, -2: use `ts`).
pub(super) fn deadline_of(timeout_ms: c_int, ts: *const libc::timespec) -> Option<Instant> {
    let d = if timeout_ms == -2 {
        if ts.is_null() {
            return None;
        }
        // SAFETY: the program passed a valid timespec pointer to ppoll/epoll_pwait2.
        let t = unsafe { *ts };
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    } else if timeout_ms < 0 {
        return None;
    } else {
        Duration::from_millis(timeout_ms as u64)
    };
    // A timeout too large for the clock (some programs pass LONG_MAX for "forever") is
    // no deadline at all.
    Instant::now().checked_add(d)
}

/// The slice to wait now: until the program's deadline or the AEH's next timer.
pub(super) fn slice_ms(deadline: Option<Instant>, wake: Option<Instant>) -> c_int {
    let t = match (deadline, wake) {
        (None, None) => return -1,
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(b)) => a.min(b),
    };
    net::ms_ceil(t.saturating_duration_since(Instant::now()))
}

pub(super) fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

impl GcbLayer {
    /// The layer for the broker pool `pool` (not empty; one broker is a pool of one).
    pub fn new(
        pool: Vec<SocketAddrV4>,
        key: Option<gcb_proto::PoolKey>,
        heartbeat: Duration,
        standby: bool,
    ) -> GcbLayer {
        GcbLayer {
            client: ForkMutex::new(Client::new(pool, host_id(), key, heartbeat, standby)),
        }
    }

    /// The pool's first broker's IP: where this process's proxies live (with a pool,
    /// most of them; see [`GcbLayer::is_broker_ip`]).
    pub fn broker_ip(&self) -> std::net::Ipv4Addr {
        *self.client.lock().broker.ip()
    }

    /// Is `ip` a broker of the pool (where proxies live)?
    pub fn is_broker_ip(&self, ip: std::net::Ipv4Addr) -> bool {
        self.client.lock().is_pool_ip(ip)
    }

    /// The client, behind its lock.
    pub fn client(&self) -> &ForkMutex<Client> {
        &self.client
    }

    /// Run the AEH once if this process has something to serve; returns the fds it
    /// waits on and its next timer.
    pub fn pump(&self) -> Option<(Vec<c_int>, Option<Instant>)> {
        let mut c = self.client.lock();
        if !c.needs_aeh() {
            return None;
        }
        c.pump();
        Some((c.aeh_fds(), c.next_wakeup()))
    }

    /// AEH state for a wait: the fds it waits on and its next timer, if it must run.
    pub(super) fn aeh(&self) -> Option<(Vec<c_int>, Option<Instant>)> {
        let c = self.client.lock();
        if !c.needs_aeh() {
            return None;
        }
        Some((c.aeh_fds(), c.next_wakeup()))
    }
}
