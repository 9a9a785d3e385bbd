//! The daemon's state machine: the three representations (mapping table,
//! mirror file, kernel table) kept consistent in the paper's orders, the
//! request policy (ownership, range, quota, rate), liveness results and the
//! sync. No sockets here: the server feeds it requests and probe results.
//!
//! * **Add** (paper 3.2.2): table, mirror (appended and fdatasynced), then
//!   kernel; the reply is sent after all three. Rule reuse: the same rule
//!   (public port, private address, probe port) changes nothing; the same
//!   public port and private address with different client information (a
//!   new probe port) changes only the table and the mirror.
//! * **Delete**: table, kernel, mirror. Exception: a port freed and taken
//!   again in one batch has its delete record written with the batch's adds,
//!   before the new holder's record (the mirror's history then never gives a
//!   port from one client to another without a delete in between).
//! * **Refusals** change nothing. A failure after the table changed (mirror
//!   write, kernel transaction) is rolled back: table restored, a
//!   compensating mirror record appended, so nothing stays half-installed.
//! * **Batches**: requests that arrive together are planned one by one
//!   against the table, then committed with one mirror append (one fsync)
//!   and one nft transaction; if that transaction fails, each request is
//!   retried alone so only the failing ones are refused.
//! * **Sync** (3.2.2.1), after each probe round: replay the mirror file
//!   (under today's policy: see [`crate::mirror`], "Replay never installs
//!   what today's daemon would refuse"),
//!   make the table equal to it, compact the file, then make our kernel
//!   table equal to it (re-installing what an operator or a reboot removed;
//!   since the table is ours alone, elements not in the mirror are removed).
//!
//! ## Conntrack
//!
//! A dnat decision lives in the conntrack entry of a flow, not in the map:
//! after a mapping is removed, its flows keep going to the old holder. So a
//! public port handed to a new holder has the entries to it (original
//! destination public address, that transport and port) removed before the
//! reply is sent ([`KernelBackend::flush_conntrack`]), unless it goes back
//! to the private address it was last handed to (those flows are that
//! socket's own). Every filtered `conntrack` command walks the whole
//! conntrack table (~10 ms even when it is empty, four times an nft
//! transaction), so the flush only runs for *dirty* ports, and handing out
//! a *clean* one runs no conntrack tool at all. Keys are (transport, port):
//! TCP 20000 and UDP 20000 are separate ports with separate entries.
//!
//! * At the start, after the kernel table matches the mirror file (so no
//!   stale element creates entries any more), one listing
//!   ([`KernelBackend::conntrack_ports`]) finds the ports that have entries
//!   now: those are dirty, and so is every mapped port. This covers
//!   mappings a previous run removed before it crashed: their entries, if
//!   still alive, are in the listing. If the listing fails, every port is
//!   dirty (each hand-out flushes, as before) until a sync lists again.
//! * A port becomes dirty when its mapping goes: deleted, moved to another
//!   public port, removed after a failed probe, dropped from the table by a
//!   sync, or its kernel element removed or replaced by a sync. A kernel
//!   table replaced without knowing its elements (missing, or edited by
//!   hand) makes every port dirty until the next listing (the same sync).
//! * A successful flush makes the port clean (later entries are the new
//!   holder's); a failed one leaves it dirty, so the next hand-out flushes
//!   again (the mapping is installed either way, as before).
//!
//! Residual risk: an entry that did not go through our dnat is not
//! tracked. Traffic to a clean port while nobody holds it (a scanner, a
//! peer using a stale address) creates an entry to the gateway itself; if
//! the port is then handed out, that one flow (same addresses and ports)
//! keeps reaching the gateway instead of the new holder until the entry
//! expires. For TCP this costs nothing in practice (a new connection uses a
//! new source port, and a SYN that meets a closed entry re-creates it
//! through the nat). For UDP the entry lives 30 s after its last packet
//! (`nf_conntrack_udp_timeout`): a peer that keeps sending from the same
//! port, more often than that, since before the hand-out, never reaches the
//! new holder; `conntrack -D -p udp --orig-dst PUBLIC --orig-port-dst PORT`
//! on the gateway clears it. Peers normally learn a public port from the
//! holder, after the reply, so their flows start after the mapping.
//! (Flushing at every hand-out would remove these too, for ~10 ms each.)
//! The same applies to a port handed back to its last holder (never
//! flushed, dirty or not).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Instant;

use gcb_proto::{Body, ErrorCode, Transport};

use crate::cidr::{Cidr, PortRange};
use crate::kernel::{Elements, KernelBackend, KernelError, Op};
use crate::mirror::{write_atomic, Mirror, Policy, Record, Replay};
use crate::table::{Entry, Key, Table};

/// File holding the epoch in the state directory.
pub const EPOCH_FILE: &str = "epoch";
/// Lock file in the state directory (one daemon per state directory).
pub const LOCK_FILE: &str = "lock";

/// Policy and addresses.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The gateway's public address (what clients are told).
    pub public: Ipv4Addr,
    /// The private network: requests only from here, targets only here.
    pub private: Cidr,
    /// Public ports handed out.
    pub ports: PortRange,
    /// Mappings per client (private IP), TCP and UDP together.
    pub quota: usize,
    /// Requests per second per client (0: unlimited).
    pub rate: f64,
    /// Burst of requests a client may send above `rate`.
    pub burst: f64,
    /// Consecutive probe rounds without an answer (timeouts) before a
    /// client's mappings are removed; a refused probe removes them at once.
    pub probe_failures: u32,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// State directory problems.
    #[error("state directory {dir}: {what}: {source}")]
    State {
        /// The directory.
        dir: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another daemon holds the state directory.
    #[error("state directory {0} is locked by another gcb-portfwd")]
    Locked(PathBuf),
    /// The kernel table could not be set up.
    #[error("kernel table: {0}")]
    Kernel(#[from] KernelError),
}

/// Counters for the stats line.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// New mappings installed.
    pub added: u64,
    /// Forward requests answered with an existing identical rule.
    pub reused: u64,
    /// Forward requests that only changed client information.
    pub updated: u64,
    /// Mappings deleted by request.
    pub deleted: u64,
    /// Queries answered.
    pub queries: u64,
    /// Refused requests (every error reply).
    pub refused: u64,
    /// Refusals for rate limiting.
    pub rate_limited: u64,
    /// Requests rolled back after a mirror or kernel failure.
    pub rolled_back: u64,
    /// Mirror write failures.
    pub mirror_errors: u64,
    /// Kernel failures (transactions, listings, conntrack).
    pub kernel_errors: u64,
    /// Probes answered / refused / unanswered.
    pub probes_ok: u64,
    /// Probes refused (socket closed).
    pub probes_refused: u64,
    /// Probes that timed out or failed otherwise.
    pub probes_failed: u64,
    /// Mappings removed because their probe failed.
    pub removed_by_probe: u64,
    /// Syncs that had to repair the kernel table.
    pub kernel_repairs: u64,
    /// Ports whose old conntrack entries were flushed.
    pub conntrack_flushed: u64,
    /// Ports handed to a new holder without running the conntrack tool
    /// (clean: nothing to flush).
    pub conntrack_skipped: u64,
    /// Mappings in the mirror file that replay did not install (out of
    /// today's policy, conflicting, or before a corrupt record).
    pub quarantined: u64,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Mirror replay result.
    pub replay: Replay,
    /// Table entries changed to match the mirror.
    pub table_fixed: usize,
    /// Kernel elements added / removed to match.
    pub kernel_added: usize,
    /// Kernel elements removed.
    pub kernel_removed: usize,
    /// The whole kernel table was (re)created.
    pub kernel_replaced: bool,
}

/// A probe's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The management socket accepted the connection.
    Alive,
    /// Connection refused: no socket listens there any more.
    Refused,
    /// Timeout, unreachable, or another error.
    Failed,
}

#[derive(Debug)]
enum Undo {
    Remove(Key),
    Restore(Key, Entry),
}

#[derive(Debug, Default)]
struct Plan {
    reply: Option<Body>,
    pre: Vec<Record>,
    post: Vec<Record>,
    ops: Vec<Op>,
    undo: Vec<Undo>,
    flush: Vec<Key>,
    kind: PlanKind,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum PlanKind {
    #[default]
    None,
    Added,
    Updated,
    Reused,
    Deleted,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The DPF server state (see module docs).
pub struct Core<K: KernelBackend> {
    cfg: CoreConfig,
    table: Table,
    mirror: Mirror,
    kernel: K,
    epoch: u64,
    next_port: u16,
    born: HashMap<Key, Instant>,
    /// The private address each public port was last handed to (memory only): a port
    /// handed back to the same private address keeps its conntrack flows, which are that
    /// socket's own (iperf3 -u re-binds its port while a connected flow still uses it).
    last_holder: HashMap<Key, SocketAddrV4>,
    /// Ports that may have conntrack entries from an earlier mapping (module docs,
    /// "Conntrack"); a port not in here and not mapped has none.
    dirty: BTreeSet<Key>,
    /// No conntrack listing since the start or since the kernel table was replaced
    /// without knowing its elements: every port is dirty until [`Core::relist`] succeeds.
    all_dirty: bool,
    failures: HashMap<SocketAddrV4, u32>,
    buckets: HashMap<Ipv4Addr, Bucket>,
    counters: Counters,
    _lock: File,
}

fn err(code: ErrorCode, reason: impl Into<String>) -> Body {
    Body::error(code, reason)
}

fn tname(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

fn lock(dir: &Path) -> Result<File, CoreError> {
    use std::os::unix::io::AsRawFd;
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|source| CoreError::State {
            dir: dir.into(),
            what: "open lock file",
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(CoreError::Locked(dir.into()));
    }
    Ok(f)
}

impl<K: KernelBackend> Core<K> {
    /// Opens the state directory (creating it), takes its lock, bumps the
    /// epoch, replays and compacts the mirror file, and makes the kernel
    /// table match it. Returns the core and what the replay found.
    pub fn open(
        cfg: CoreConfig,
        kernel: K,
        dir: &Path,
    ) -> Result<(Core<K>, SyncReport), CoreError> {
        let st = |what: &'static str| {
            let dir = dir.to_path_buf();
            move |source| CoreError::State { dir, what, source }
        };
        std::fs::create_dir_all(dir).map_err(st("create"))?;
        let lock = lock(dir)?;
        let epoch = match std::fs::read_to_string(dir.join(EPOCH_FILE)) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(st("read epoch")(e)),
        }
        .wrapping_add(1)
        .max(1);
        write_atomic(dir, EPOCH_FILE, format!("{epoch}\n").as_bytes())
            .map_err(st("write epoch"))?;
        let policy = Policy {
            private: cfg.private,
            ports: cfg.ports,
            quota: cfg.quota,
        };
        let (mirror, table, replay) = Mirror::open(dir, policy).map_err(st("open mirror"))?;
        // Before the kernel is touched: what is quarantined is named first.
        replay.log();
        let now = Instant::now();
        let born = table.iter().map(|(k, _)| (k, now)).collect();
        let mut core = Core {
            next_port: cfg.ports.lo,
            cfg,
            table,
            mirror,
            kernel,
            epoch,
            born,
            last_holder: HashMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            failures: HashMap::new(),
            buckets: HashMap::new(),
            counters: Counters {
                quarantined: replay.quarantined.len() as u64,
                ..Counters::default()
            },
            _lock: lock,
        };
        let mut report = core.sync_kernel()?;
        report.replay = replay;
        // After the kernel table is as the mirror says: no stale element can
        // create entries any more.
        core.relist();
        Ok((core, report))
    }

    /// This daemon run's epoch (1 for the first start, +1 per start).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The mapping table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The kernel backend.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The kernel backend, mutably (tests).
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// The mirror file.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// The mirror file, mutably (tests).
    pub fn mirror_mut(&mut self) -> &mut Mirror {
        &mut self.mirror
    }

    /// Whether handing `key` to a new holder runs the conntrack flush (it may
    /// have entries from an earlier mapping).
    pub fn is_dirty(&self, key: Key) -> bool {
        self.all_dirty || self.dirty.contains(&key)
    }

    /// Lists the conntrack entries to the public address and makes them the
    /// dirty ports, with every mapped port. On failure every port stays dirty
    /// (retried at the next sync).
    fn relist(&mut self) {
        match self.kernel.conntrack_ports() {
            Ok(present) => {
                self.dirty = present;
                self.dirty.extend(self.table.iter().map(|(k, _)| k));
                self.all_dirty = false;
            }
            Err(e) => {
                self.counters.kernel_errors += 1;
                log!(
                    Warn,
                    "listing conntrack entries: {e}; every port handed out is flushed until a listing works"
                );
            }
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    fn rate_ok(&mut self, now: Instant, ip: Ipv4Addr) -> bool {
        if self.cfg.rate <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.cfg.rate, self.cfg.burst.max(1.0));
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Checks the source and (for forward/delete) the ownership of `private`.
    fn check_source(
        &mut self,
        now: Instant,
        from: IpAddr,
        private: Option<SocketAddr>,
    ) -> Result<Ipv4Addr, Body> {
        let src = match from {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(ip) => ip,
                None => {
                    return Err(err(
                        ErrorCode::Unauthorized,
                        format!(
                            "source {from} is not in the private network {}",
                            self.cfg.private
                        ),
                    ))
                }
            },
        };
        if !self.cfg.private.contains(src) {
            return Err(err(
                ErrorCode::Unauthorized,
                format!(
                    "source {src} is not in the private network {}",
                    self.cfg.private
                ),
            ));
        }
        if let Some(p) = private {
            let SocketAddr::V4(p) = p else {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("private address {p} is not IPv4"),
                ));
            };
            if *p.ip() != src {
                return Err(err(
                    ErrorCode::NotOwner,
                    format!(
                        "a client may only map its own address: request names {} but comes from {src}",
                        p.ip()
                    ),
                ));
            }
            if p.port() == 0 {
                return Err(err(
                    ErrorCode::BadRequest,
                    "private port 0 (bind before asking)",
                ));
            }
        }
        if !self.rate_ok(now, src) {
            self.counters.rate_limited += 1;
            return Err(err(
                ErrorCode::Busy,
                format!(
                    "rate limit: {src} sends more than {} requests/s; retry later",
                    self.cfg.rate
                ),
            ));
        }
        Ok(src)
    }

    fn allocate(&mut self, t: Transport, preferred: u16) -> Option<u16> {
        let r = self.cfg.ports;
        if r.contains(preferred) && self.table.get((t, preferred)).is_none() {
            return Some(preferred);
        }
        let mut p = self.next_port.clamp(r.lo, r.hi);
        for _ in 0..r.len() {
            let cand = p;
            p = if p == r.hi { r.lo } else { p + 1 };
            if self.table.get((t, cand)).is_none() {
                self.next_port = p;
                return Some(cand);
            }
        }
        None
    }

    fn plan(&mut self, now: Instant, from: IpAddr, body: Body) -> Plan {
        let epoch = self.epoch;
        let refuse = |b: Body| Plan {
            reply: Some(b),
            ..Plan::default()
        };
        match body {
            Body::Forward {
                transport: t,
                private,
                desired_public_port,
                probe_port,
            } => {
                let src = match self.check_source(now, from, Some(private)) {
                    Ok(s) => s,
                    Err(b) => return refuse(b),
                };
                let SocketAddr::V4(private) = private else {
                    unreachable!("checked by check_source")
                };
                if probe_port == 0 {
                    return refuse(err(
                        ErrorCode::BadRequest,
                        "probe_port 0: a management socket is required",
                    ));
                }
                let desired = desired_public_port.filter(|&p| p != 0);
                if let Some(d) = desired {
                    if !self.cfg.ports.contains(d) {
                        return refuse(err(
                            ErrorCode::PortRange,
                            format!("public port {d} is outside the range {}", self.cfg.ports),
                        ));
                    }
                }
                let entry = Entry {
                    private,
                    probe_port,
                };
                let pub_ip = self.cfg.public;
                let public = move |port| SocketAddr::from((pub_ip, port));
                let existing = self.table.public_of(t, private);
                if let Some(p) = existing.filter(|&p| desired.is_none_or(|d| d == p)) {
                    let key = (t, p);
                    let old = *self.table.get(key).expect("indexed");
                    let reply = Some(Body::Forwarded {
                        public: public(p),
                        epoch,
                    });
                    if old == entry {
                        return Plan {
                            reply,
                            kind: PlanKind::Reused,
                            ..Plan::default()
                        };
                    }
                    self.table.insert(key, entry);
                    return Plan {
                        reply,
                        pre: vec![Record::Add(key, entry)],
                        undo: vec![Undo::Restore(key, old)],
                        kind: PlanKind::Updated,
                        ..Plan::default()
                    };
                }
                let have = self.table.count_of(src) - usize::from(existing.is_some());
                if have >= self.cfg.quota {
                    return refuse(err(
                        ErrorCode::Quota,
                        format!(
                            "client {src} has {have} mappings (quota {})",
                            self.cfg.quota
                        ),
                    ));
                }
                let port = match desired {
                    Some(d) => {
                        if let Some(other) = self.table.get((t, d)) {
                            return refuse(err(
                                ErrorCode::PortRange,
                                format!(
                                    "public port {d}/{} is in use by {}",
                                    tname(t),
                                    other.private
                                ),
                            ));
                        }
                        d
                    }
                    None => match self.allocate(t, private.port()) {
                        Some(p) => p,
                        None => {
                            return refuse(err(
                                ErrorCode::PortRange,
                                format!(
                                    "no free {} port in the range {}",
                                    tname(t),
                                    self.cfg.ports
                                ),
                            ))
                        }
                    },
                };
                let key = (t, port);
                let removed = self.table.insert(key, entry);
                // Old flows to this port are flushed unless they were this address's own.
                let same_holder = self.last_holder.insert(key, private) == Some(private);
                let mut plan = Plan {
                    reply: Some(Body::Forwarded {
                        public: public(port),
                        epoch,
                    }),
                    kind: PlanKind::Added,
                    pre: vec![Record::Add(key, entry)],
                    flush: if same_holder { vec![] } else { vec![key] },
                    undo: vec![Undo::Remove(key)],
                    ..Plan::default()
                };
                for (k, e) in removed {
                    // the same private address moved to another public port
                    self.dirty.insert(k);
                    plan.ops.push(Op::Del(k));
                    plan.post.push(Record::Del(k));
                    plan.undo.push(Undo::Restore(k, e));
                }
                plan.ops.push(Op::Add(key, private));
                plan
            }
            Body::Delete {
                transport: t,
                private,
            } => {
                if let Err(b) = self.check_source(now, from, Some(private)) {
                    return refuse(b);
                }
                let SocketAddr::V4(private) = private else {
                    unreachable!("checked by check_source")
                };
                let reply = Some(Body::Deleted { epoch });
                match self.table.public_of(t, private) {
                    Some(p) => {
                        let key = (t, p);
                        let old = self.table.remove(key).expect("indexed");
                        // Its flows stay (they may be the client's own) until
                        // the port goes to another holder.
                        self.dirty.insert(key);
                        Plan {
                            reply,
                            ops: vec![Op::Del(key)],
                            post: vec![Record::Del(key)],
                            undo: vec![Undo::Restore(key, old)],
                            kind: PlanKind::Deleted,
                            ..Plan::default()
                        }
                    }
                    // Idempotent: nothing mapped is what the client wants.
                    None => Plan {
                        reply,
                        ..Plan::default()
                    },
                }
            }
            Body::Query {
                transport: t,
                public,
            } => {
                if let Err(b) = self.check_source(now, from, None) {
                    return refuse(b);
                }
                self.counters.queries += 1;
                let private = match public {
                    SocketAddr::V4(p) if *p.ip() == self.cfg.public => self
                        .table
                        .get((t, p.port()))
                        .map(|e| SocketAddr::V4(e.private)),
                    _ => None,
                };
                refuse(Body::QueryResult { private, epoch })
            }
            other => refuse(err(
                ErrorCode::Unsupported,
                format!(
                    "gcb-portfwd answers forward, delete and query, not {}",
                    other.type_name()
                ),
            )),
        }
    }

    fn undo(&mut self, plan: &Plan) -> Vec<Record> {
        let mut comp = Vec::new();
        for u in plan.undo.iter().rev() {
            match *u {
                Undo::Remove(k) => {
                    self.table.remove(k);
                    self.born.remove(&k);
                    // Planning recorded the new holder; it never held the port.
                    self.last_holder.remove(&k);
                    comp.push(Record::Del(k));
                }
                Undo::Restore(k, e) => {
                    self.table.insert(k, e);
                    comp.push(Record::Add(k, e));
                }
            }
        }
        comp
    }

    /// Handles requests that arrived together; returns one reply per
    /// request, in order. `from` is the datagram's source address.
    pub fn handle_batch(&mut self, now: Instant, reqs: Vec<(IpAddr, Body)>) -> Vec<Body> {
        let mut plans: Vec<Plan> = reqs
            .into_iter()
            .map(|(from, b)| self.plan(now, from, b))
            .collect();
        // A port freed by one request and taken by a later one of the same batch: its
        // delete record goes with the adds, before the new holder's record, so the
        // file's history never shows a port passing from one client to another without
        // a delete (and a replay ends with the new holder, not with nothing).
        for j in 1..plans.len() {
            let taken: Vec<Key> = plans[j]
                .pre
                .iter()
                .filter_map(|r| match r {
                    Record::Add(k, _) => Some(*k),
                    Record::Del(_) => None,
                })
                .collect();
            for k in taken {
                for p in &mut plans[..j] {
                    if let Some(i) = p.post.iter().position(|r| *r == Record::Del(k)) {
                        p.post.remove(i);
                        p.pre.push(Record::Del(k));
                    }
                }
            }
        }
        let mut failed = vec![false; plans.len()];
        let fail_reply = |p: &mut Plan, why: String| {
            p.reply = Some(err(ErrorCode::Internal, why));
        };

        // Mirror first (adds and client-info updates), one fdatasync.
        let pre: Vec<Record> = plans.iter().flat_map(|p| p.pre.iter().copied()).collect();
        if let Err(e) = self.mirror.append(&pre) {
            self.counters.mirror_errors += 1;
            log!(Error, "mirror file {}: {e}", self.mirror.path().display());
            for (i, p) in plans.iter_mut().enumerate().rev() {
                if !p.pre.is_empty() {
                    self.undo_table_only(p);
                    failed[i] = true;
                    fail_reply(p, format!("cannot write the mirror file: {e}"));
                }
            }
        }

        // Kernel: one transaction for all; on failure, one per request.
        let ops: Vec<Op> = plans
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .flat_map(|(p, _)| p.ops.iter().copied())
            .collect();
        if ops.is_empty() {
            // nothing for the kernel (reuse, queries, refusals)
        } else if let Err(e) = self.kernel.apply(&ops) {
            self.counters.kernel_errors += 1;
            log!(
                Warn,
                "kernel transaction of {} ops failed ({e}); retrying one request at a time",
                ops.len()
            );
            self.retry_kernel(&mut plans, &mut failed);
        }

        // Old flows to newly handed-out ports go before the client hears;
        // clean ports have none (module docs, "Conntrack").
        let (flush, clean): (Vec<Key>, Vec<Key>) = plans
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .flat_map(|(p, _)| p.flush.iter().copied())
            .partition(|k| self.is_dirty(*k));
        self.counters.conntrack_skipped += clean.len() as u64;
        if !flush.is_empty() {
            match self.kernel.flush_conntrack(&flush) {
                Ok(n) => {
                    self.counters.conntrack_flushed += n as u64;
                    // Entries made from now on are the new holder's.
                    for k in &flush {
                        self.dirty.remove(k);
                    }
                }
                Err(e) => {
                    // They stay dirty: the next hand-out flushes again.
                    self.counters.kernel_errors += 1;
                    log!(Warn, "conntrack flush of {} ports: {e}", flush.len());
                }
            }
        }

        // Mirror last for deletions.
        let post: Vec<Record> = plans
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .flat_map(|(p, _)| p.post.iter().copied())
            .collect();
        if let Err(e) = self.mirror.append(&post) {
            // Table and kernel no longer have these; the mirror still does
            // until the next sync replays it (garbage the next probe removes).
            self.counters.mirror_errors += 1;
            log!(
                Error,
                "mirror file {}: recording {} deletions: {e}",
                self.mirror.path().display(),
                post.len()
            );
        }

        let mut replies = Vec::with_capacity(plans.len());
        for (p, f) in plans.into_iter().zip(failed) {
            let reply = p
                .reply
                .unwrap_or_else(|| err(ErrorCode::Internal, "no reply"));
            match (&reply, f) {
                (Body::Error { code, reason }, _) => {
                    self.counters.refused += 1;
                    log!(Warn, "refused: {code}: {reason}");
                }
                (Body::Forwarded { public, .. }, false) => match p.kind {
                    PlanKind::Added => {
                        self.counters.added += 1;
                        if let Some(Op::Add(k, a)) = p.ops.last() {
                            self.born.insert(*k, now);
                            log!(Info, "added {}/{} -> {a}", public, tname(k.0));
                        }
                    }
                    PlanKind::Updated => self.counters.updated += 1,
                    _ => self.counters.reused += 1,
                },
                (Body::Deleted { .. }, false) if p.kind == PlanKind::Deleted => {
                    self.counters.deleted += 1;
                    if let Some(Op::Del(k)) = p.ops.first() {
                        self.born.remove(k);
                        log!(Info, "deleted {}:{}/{}", self.cfg.public, k.1, tname(k.0));
                    }
                }
                _ => {}
            }
            replies.push(reply);
        }
        replies
    }

    /// Mirror append failed: restore the table (nothing was written).
    fn undo_table_only(&mut self, p: &Plan) {
        let _ = self.undo(p);
        self.counters.rolled_back += 1;
    }

    fn retry_kernel(&mut self, plans: &mut [Plan], failed: &mut [bool]) {
        // A missing or edited table: rebuild it from the (already updated)
        // mapping table in one go.
        match self.kernel.list() {
            Ok(None) => {
                let want = self.table.kernel_elements();
                // Its elements are unknown: any port may have had one.
                self.all_dirty = true;
                if self.kernel.replace_all(&want).is_ok() {
                    self.counters.kernel_repairs += 1;
                    log!(
                        Warn,
                        "kernel table was missing or modified: re-created with {} mappings",
                        want.len()
                    );
                    return;
                }
            }
            Ok(Some(_)) => {}
            Err(e) => log!(Warn, "cannot list the kernel table: {e}"),
        }
        for i in 0..plans.len() {
            if failed[i] || plans[i].ops.is_empty() {
                continue;
            }
            let cur = self.kernel.list().ok().flatten().unwrap_or_default();
            // Deletions of elements already gone are done; an add over a
            // different value replaces it.
            let mut ops = Vec::new();
            for op in &plans[i].ops {
                match *op {
                    Op::Del(k) if !cur.contains_key(&k) => {}
                    Op::Add(k, a) if cur.get(&k) == Some(&a) => {}
                    Op::Add(k, a) if cur.contains_key(&k) => {
                        ops.push(Op::Del(k));
                        ops.push(Op::Add(k, a));
                    }
                    o => ops.push(o),
                }
            }
            if let Err(e) = self.kernel.apply(&ops) {
                self.counters.kernel_errors += 1;
                failed[i] = true;
                self.counters.rolled_back += 1;
                // nft transactions are atomic: the kernel is unchanged.
                let comp = self.undo(&plans[i]);
                let plan = &mut plans[i];
                // A pure deletion never reached the mirror; anything else
                // gets compensating records.
                if !plan.pre.is_empty() {
                    if let Err(me) = self.mirror.append(&comp) {
                        self.counters.mirror_errors += 1;
                        log!(Error, "mirror rollback: {me}");
                    }
                }
                plan.reply = Some(err(
                    ErrorCode::Internal,
                    format!("cannot install the forwarding rule: {e}"),
                ));
            }
        }
    }

    /// Distinct management sockets to probe.
    pub fn probe_targets(&self) -> Vec<SocketAddrV4> {
        self.table.probe_targets().into_keys().collect()
    }

    /// Applies a probe round that started at `started`: mappings whose
    /// management socket refused (or failed `probe_failures` rounds in a
    /// row) are removed (table, kernel, mirror). Mappings created after the
    /// round started are left alone. Returns the keys removed.
    pub fn apply_probe_results(
        &mut self,
        started: Instant,
        results: &[(SocketAddrV4, ProbeOutcome)],
    ) -> Vec<Key> {
        let targets = self.table.probe_targets();
        let mut dead = Vec::new();
        for (target, outcome) in results {
            match outcome {
                ProbeOutcome::Alive => {
                    self.counters.probes_ok += 1;
                    self.failures.remove(target);
                    continue;
                }
                ProbeOutcome::Refused => self.counters.probes_refused += 1,
                ProbeOutcome::Failed => {
                    self.counters.probes_failed += 1;
                    let n = self.failures.entry(*target).or_default();
                    *n += 1;
                    if *n < self.cfg.probe_failures {
                        log!(
                            Info,
                            "probe of {target} unanswered ({n}/{})",
                            self.cfg.probe_failures
                        );
                        continue;
                    }
                }
            }
            self.failures.remove(target);
            for k in targets.get(target).map(Vec::as_slice).unwrap_or(&[]) {
                if self.born.get(k).is_some_and(|b| *b > started) {
                    continue;
                }
                dead.push((*k, *target, *outcome));
            }
        }
        let mut removed = Vec::new();
        for (k, target, outcome) in &dead {
            if let Some(e) = self.table.remove(*k) {
                self.born.remove(k);
                self.dirty.insert(*k);
                log!(
                    Info,
                    "removed {}:{}/{} -> {} (management socket {target}: {:?})",
                    self.cfg.public,
                    k.1,
                    tname(k.0),
                    e.private,
                    outcome
                );
                removed.push(*k);
            }
        }
        if removed.is_empty() {
            return removed;
        }
        self.counters.removed_by_probe += removed.len() as u64;
        let ops: Vec<Op> = removed.iter().map(|k| Op::Del(*k)).collect();
        if let Err(e) = self.kernel.apply(&ops) {
            // The sync right after reconciles the kernel table.
            self.counters.kernel_errors += 1;
            log!(
                Warn,
                "removing {} dead mappings from the kernel: {e}",
                ops.len()
            );
        }
        let recs: Vec<Record> = removed.iter().map(|k| Record::Del(*k)).collect();
        if let Err(e) = self.mirror.append(&recs) {
            self.counters.mirror_errors += 1;
            log!(Error, "mirror file: recording {} removals: {e}", recs.len());
        }
        removed
    }

    /// Synchronizes the three representations from the mirror file (see
    /// module docs). Also forgets idle rate-limit state.
    pub fn sync(&mut self, now: Instant) -> SyncReport {
        let burst = self.cfg.burst;
        let rate = self.cfg.rate;
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + dt * rate < burst
        });
        let mut report = SyncReport::default();
        match self.mirror.read() {
            Ok((mtable, replay)) => {
                replay.log();
                self.counters.quarantined += replay.quarantined.len() as u64;
                report.replay = replay;
                if mtable != self.table {
                    let a = self.table.kernel_elements();
                    let b = mtable.kernel_elements();
                    report.table_fixed = a.iter().filter(|(k, v)| b.get(k) != Some(v)).count()
                        + b.keys().filter(|k| !a.contains_key(k)).count();
                    log!(
                        Warn,
                        "mapping table differed from the mirror file in {} mappings: reloaded",
                        report.table_fixed
                    );
                    for (k, _) in a.iter().filter(|(k, v)| b.get(k) != Some(v)) {
                        self.dirty.insert(*k);
                    }
                    let now = Instant::now();
                    self.born.retain(|k, _| mtable.get(*k).is_some());
                    for (k, _) in mtable.iter() {
                        self.born.entry(k).or_insert(now);
                    }
                    self.table = mtable;
                }
                if let Err(e) = self.mirror.compact(&self.table) {
                    self.counters.mirror_errors += 1;
                    log!(Error, "compacting the mirror file: {e}");
                }
            }
            Err(e) => {
                self.counters.mirror_errors += 1;
                log!(Error, "reading the mirror file: {e}");
            }
        }
        match self.sync_kernel() {
            Ok(k) => {
                report.kernel_added = k.kernel_added;
                report.kernel_removed = k.kernel_removed;
                report.kernel_replaced = k.kernel_replaced;
            }
            Err(e) => {
                self.counters.kernel_errors += 1;
                log!(Error, "kernel sync: {e}");
            }
        }
        if self.all_dirty {
            self.relist();
        }
        report
    }

    fn sync_kernel(&mut self) -> Result<SyncReport, KernelError> {
        let want = self.table.kernel_elements();
        let mut r = SyncReport::default();
        let have = self.kernel.list()?;
        match have {
            Some(have) if have == want => {}
            Some(have) => {
                let ops = diff(
                    &have,
                    &want,
                    have.keys()
                        .chain(want.keys())
                        .copied()
                        .collect::<Vec<_>>()
                        .into_iter(),
                );
                r.kernel_added = ops.iter().filter(|o| matches!(o, Op::Add(..))).count();
                r.kernel_removed = ops.len() - r.kernel_added;
                // A removed or replaced element may have created entries.
                for op in &ops {
                    if let Op::Del(k) = op {
                        self.dirty.insert(*k);
                    }
                }
                if let Err(e) = self.kernel.apply(&ops) {
                    log!(Warn, "kernel reconcile failed ({e}); re-creating the table");
                    self.kernel.replace_all(&want)?;
                    r.kernel_replaced = true;
                }
                self.counters.kernel_repairs += 1;
                log!(
                    Warn,
                    "kernel table reconciled: {} re-installed, {} removed",
                    r.kernel_added,
                    r.kernel_removed
                );
            }
            None => {
                // Missing or edited by hand: its elements are unknown.
                self.all_dirty = true;
                self.kernel.replace_all(&want)?;
                r.kernel_replaced = true;
                r.kernel_added = want.len();
                self.counters.kernel_repairs += 1;
                log!(Info, "kernel table created with {} mappings", want.len());
            }
        }
        Ok(r)
    }

    /// Milliseconds until a client's bucket has a token again (tests).
    pub fn rate_state(&self, ip: Ipv4Addr) -> Option<f64> {
        self.buckets.get(&ip).map(|b| b.tokens)
    }
}

/// Ops turning `have` into `want` for the given keys.
fn diff(have: &Elements, want: &Elements, keys: impl Iterator<Item = Key>) -> Vec<Op> {
    let mut seen = BTreeMap::new();
    for k in keys {
        seen.insert(k, ());
    }
    let mut ops = Vec::new();
    for k in seen.keys() {
        match (have.get(k), want.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(b)) => {
                ops.push(Op::Del(*k));
                ops.push(Op::Add(*k, *b));
            }
            (Some(_), None) => ops.push(Op::Del(*k)),
            (None, Some(b)) => ops.push(Op::Add(*k, *b)),
            (None, None) => {}
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::FakeKernel;
    use crate::mirror::replay;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    const A1: [u8; 4] = [10, 1, 0, 11];
    const A2: [u8; 4] = [10, 1, 0, 12];

    fn cfg() -> CoreConfig {
        CoreConfig {
            public: Ipv4Addr::new(203, 0, 113, 1),
            private: "10.1.0.0/24".parse().unwrap(),
            ports: "20000-20009".parse().unwrap(),
            quota: 3,
            rate: 0.0,
            burst: 10.0,
            probe_failures: 2,
        }
    }

    /// The tests' policy for reading a mirror file (no quota).
    fn policy() -> Policy {
        Policy {
            private: cfg().private,
            ports: cfg().ports,
            quota: usize::MAX,
        }
    }

    fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    fn fwd(ip: [u8; 4], port: u16, desired: Option<u16>, probe: u16) -> Body {
        Body::Forward {
            transport: Transport::Tcp,
            private: sa(ip, port),
            desired_public_port: desired,
            probe_port: probe,
        }
    }

    fn open(dir: &Path) -> Core<FakeKernel> {
        Core::open(cfg(), FakeKernel::new(), dir).unwrap().0
    }

    fn one(c: &mut Core<FakeKernel>, from: [u8; 4], b: Body) -> Body {
        c.handle_batch(Instant::now(), vec![(IpAddr::from(from), b)])
            .pop()
            .unwrap()
    }

    fn public_port(b: &Body) -> u16 {
        match b {
            Body::Forwarded { public, .. } => public.port(),
            other => panic!("not forwarded: {other:?}"),
        }
    }

    fn code(b: &Body) -> ErrorCode {
        match b {
            Body::Error { code, .. } => *code,
            other => panic!("not an error: {other:?}"),
        }
    }

    fn mirror_table(c: &Core<FakeKernel>) -> Table {
        replay(&std::fs::read(c.mirror().path()).unwrap(), &policy()).0
    }

    /// The three representations hold the same mappings.
    fn assert_consistent(c: &Core<FakeKernel>) {
        assert_eq!(&mirror_table(c), c.table(), "mirror == table");
        assert_eq!(
            c.kernel().elems.as_ref().unwrap(),
            &c.table().kernel_elements(),
            "kernel == table"
        );
    }

    #[test]
    fn add_order_is_table_mirror_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let path = c.mirror().path();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let s2 = seen.clone();
        c.kernel_mut().on_apply = Some(Box::new(move |ops| {
            // When the kernel is asked, the record is already durable.
            let on_disk = replay(&std::fs::read(&path).unwrap(), &policy()).0;
            for op in ops {
                if let Op::Add(k, a) = op {
                    assert_eq!(
                        on_disk.get(*k).map(|e| e.private),
                        Some(*a),
                        "mirror before kernel"
                    );
                    s2.borrow_mut().push(*k);
                }
            }
        }));
        let r = one(&mut c, A1, fwd(A1, 8080, None, 41000));
        assert_eq!(
            r,
            Body::Forwarded {
                public: sa([203, 0, 113, 1], 20000),
                epoch: 1
            }
        );
        assert_eq!(seen.borrow().as_slice(), &[(Transport::Tcp, 20000)]);
        assert_consistent(&c);
        // A port nobody held since the start has no entries to flush.
        assert!(c.kernel().flushed.is_empty());
    }

    fn flushes(c: &Core<FakeKernel>) -> Vec<String> {
        c.kernel()
            .journal
            .iter()
            .filter(|j| j.starts_with("flush") || j.starts_with("conntrack"))
            .cloned()
            .collect()
    }

    fn del(ip: [u8; 4], port: u16) -> Body {
        Body::Delete {
            transport: Transport::Tcp,
            private: sa(ip, port),
        }
    }

    #[test]
    fn a_fresh_port_skips_the_conntrack_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        // one listing at the start, after the kernel table is synced
        assert_eq!(flushes(&c), ["conntrack_ports"]);
        assert_eq!(c.kernel().journal.last().unwrap(), "conntrack_ports");
        let r = c.handle_batch(
            Instant::now(),
            vec![
                (IpAddr::from(A1), fwd(A1, 1, Some(20001), 1)),
                (IpAddr::from(A1), fwd(A1, 2, Some(20002), 1)),
            ],
        );
        assert_eq!((public_port(&r[0]), public_port(&r[1])), (20001, 20002));
        assert_eq!(flushes(&c), ["conntrack_ports"], "no conntrack tool run");
        assert_eq!(c.counters().conntrack_skipped, 2);
        assert_consistent(&c);
    }

    #[test]
    fn a_released_port_is_flushed_when_handed_to_another_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let k = (Transport::Tcp, 20005);
        one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
        assert!(!c.is_dirty((Transport::Udp, 20005)));
        one(&mut c, A1, del(A1, 8080));
        assert!(c.is_dirty(k), "released");
        assert!(!c.is_dirty((Transport::Udp, 20005)), "UDP is another port");
        c.kernel_mut().conntrack.insert(k);
        assert_eq!(
            public_port(&one(&mut c, A2, fwd(A2, 9, Some(20005), 1))),
            20005
        );
        assert_eq!(c.kernel().flushed, vec![k]);
        assert!(c.kernel().conntrack.is_empty());
        assert_eq!(c.counters().conntrack_flushed, 1);
        assert!(!c.is_dirty(k), "flushed: clean while A2 holds it");
        // a moved mapping releases its old port
        assert_eq!(
            public_port(&one(&mut c, A2, fwd(A2, 9, Some(20006), 1))),
            20006
        );
        assert!(c.is_dirty(k));
        // a probe removal releases it too
        let m: SocketAddrV4 = "10.1.0.12:1".parse().unwrap();
        let removed = c.apply_probe_results(Instant::now(), &[(m, ProbeOutcome::Refused)]);
        assert_eq!(removed, vec![(Transport::Tcp, 20006)]);
        assert!(c.is_dirty((Transport::Tcp, 20006)));
        c.kernel_mut().flushed.clear();
        one(&mut c, A1, fwd(A1, 7, Some(20006), 1));
        assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20006)]);
        assert_consistent(&c);
    }

    #[test]
    fn ports_with_entries_at_startup_are_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
        drop(c);
        // entries of a mapping deleted by the previous run, just before a crash
        let mut k = FakeKernel::new();
        k.elems = None;
        k.conntrack.insert((Transport::Tcp, 20003));
        let (mut c, _) = Core::open(cfg(), k, dir.path()).unwrap();
        assert!(c.is_dirty((Transport::Tcp, 20001)), "restored mapping");
        assert!(c.is_dirty((Transport::Tcp, 20003)));
        assert!(!c.is_dirty((Transport::Udp, 20003)));
        assert!(!c.is_dirty((Transport::Tcp, 20004)));
        one(&mut c, A2, fwd(A2, 3, Some(20003), 1));
        one(&mut c, A2, fwd(A2, 4, Some(20004), 1));
        assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20003)]);
        assert_eq!(c.counters().conntrack_skipped, 1);
        assert_consistent(&c);
    }

    #[test]
    fn a_failed_flush_leaves_the_port_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let k = (Transport::Tcp, 20005);
        one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
        one(&mut c, A1, del(A1, 8080));
        c.kernel_mut().conntrack.insert(k);
        c.kernel_mut().fail_conntrack = true;
        // the mapping is installed; the failure is logged and counted
        assert_eq!(
            public_port(&one(&mut c, A2, fwd(A2, 9, Some(20005), 1))),
            20005
        );
        assert_eq!(flushes(&c).last().unwrap(), "flush [(Tcp, 20005)]");
        assert_eq!(c.counters().kernel_errors, 1);
        assert!(c.is_dirty(k));
        c.kernel_mut().fail_conntrack = false;
        one(&mut c, A2, del(A2, 9));
        one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
        assert_eq!(c.kernel().flushed, vec![k]);
        assert!(!c.is_dirty(k));
        assert_consistent(&c);
    }

    #[test]
    fn unknown_conntrack_state_flushes_every_port_until_a_listing_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = FakeKernel::new();
        k.fail_conntrack = true;
        let (mut c, _) = Core::open(cfg(), k, dir.path()).unwrap();
        assert!(c.is_dirty((Transport::Tcp, 20001)));
        c.kernel_mut().fail_conntrack = false;
        one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
        assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20001)]);
        c.sync(Instant::now()); // lists again
        assert!(!c.is_dirty((Transport::Tcp, 20002)));
        one(&mut c, A1, fwd(A1, 2, Some(20002), 1));
        assert_eq!(c.kernel().flushed.len(), 1);
        // The kernel table vanished (its elements unknown): every port is
        // dirty until the listing the same sync makes.
        c.kernel_mut().elems = None;
        c.kernel_mut().conntrack.insert((Transport::Udp, 20007));
        c.sync(Instant::now());
        assert!(c.is_dirty((Transport::Udp, 20007)));
        assert!(c.is_dirty((Transport::Tcp, 20002)), "mapped");
        assert!(!c.is_dirty((Transport::Tcp, 20008)));
        // an element removed by the sync (added by hand) makes its port dirty
        let stray = (Transport::Tcp, 20009);
        c.kernel_mut()
            .elems
            .as_mut()
            .unwrap()
            .insert(stray, "10.1.0.12:9".parse().unwrap());
        c.sync(Instant::now());
        assert!(c.is_dirty(stray));
        assert_consistent(&c);
    }

    #[test]
    fn a_port_freed_and_taken_in_one_batch_stays_in_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        one(&mut c, A1, fwd(A1, 8080, Some(20005), 1));
        // a1 lets 20005 go and a2 asks for it, in the same batch
        let r = c.handle_batch(
            Instant::now(),
            vec![
                (IpAddr::from(A1), del(A1, 8080)),
                (IpAddr::from(A2), fwd(A2, 9090, Some(20005), 1)),
            ],
        );
        assert_eq!(r[0], Body::Deleted { epoch: 1 });
        assert_eq!(public_port(&r[1]), 20005);
        assert_consistent(&c);
        // ...and a restart neither loses a2's mapping nor sees a conflict
        drop(c);
        let (c, rep) = Core::open(cfg(), FakeKernel::new(), dir.path()).unwrap();
        assert_eq!(rep.replay.quarantined, vec![]);
        assert_eq!(
            c.table().get((Transport::Tcp, 20005)).map(|e| e.owner()),
            Some(Ipv4Addr::from(A2))
        );
    }

    #[test]
    fn a_port_back_to_its_last_holder_keeps_its_flows() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let del = |ip, port| Body::Delete {
            transport: Transport::Tcp,
            private: sa(ip, port),
        };
        assert_eq!(
            public_port(&one(&mut c, A1, fwd(A1, 8080, Some(20005), 41000))),
            20005
        );
        one(&mut c, A1, del(A1, 8080));
        c.kernel_mut().flushed.clear();
        // The same socket address re-binds (iperf3 -u): its own flows stay.
        assert_eq!(
            public_port(&one(&mut c, A1, fwd(A1, 8080, Some(20005), 41001))),
            20005
        );
        assert!(c.kernel().flushed.is_empty(), "{:?}", c.kernel().flushed);
        one(&mut c, A1, del(A1, 8080));
        // Another client gets the port: the old flows go.
        assert_eq!(
            public_port(&one(&mut c, A2, fwd(A2, 9090, Some(20005), 41002))),
            20005
        );
        assert_eq!(c.kernel().flushed, vec![(Transport::Tcp, 20005)]);
        assert_consistent(&c);
    }

    #[test]
    fn delete_order_is_table_kernel_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        one(&mut c, A1, fwd(A1, 8080, Some(20005), 41000));
        let path = c.mirror().path();
        let checked = Rc::new(RefCell::new(0));
        let ch = checked.clone();
        c.kernel_mut().on_apply = Some(Box::new(move |ops| {
            for op in ops {
                if let Op::Del(k) = op {
                    // Kernel before mirror: the mirror still has it.
                    let on_disk = replay(&std::fs::read(&path).unwrap(), &policy()).0;
                    assert!(on_disk.get(*k).is_some(), "kernel before mirror");
                    *ch.borrow_mut() += 1;
                }
            }
        }));
        let r = one(
            &mut c,
            A1,
            Body::Delete {
                transport: Transport::Tcp,
                private: sa(A1, 8080),
            },
        );
        assert_eq!(r, Body::Deleted { epoch: 1 });
        assert_eq!(*checked.borrow(), 1);
        assert!(c.table().is_empty());
        assert_consistent(&c);
        // idempotent
        let r = one(
            &mut c,
            A1,
            Body::Delete {
                transport: Transport::Tcp,
                private: sa(A1, 8080),
            },
        );
        assert_eq!(r, Body::Deleted { epoch: 1 });
        // only the owner may delete
        one(&mut c, A1, fwd(A1, 8080, None, 41000));
        let r = one(
            &mut c,
            A2,
            Body::Delete {
                transport: Transport::Tcp,
                private: sa(A1, 8080),
            },
        );
        assert_eq!(code(&r), ErrorCode::NotOwner);
        assert_eq!(c.table().len(), 1);
    }

    #[test]
    fn rule_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let p = public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41000)));
        let applies = |c: &Core<FakeKernel>| {
            c.kernel()
                .journal
                .iter()
                .filter(|j| j.starts_with("apply"))
                .count()
        };
        let (n_apply, mlen) = (applies(&c), c.mirror().len());
        // same rule: nothing changes anywhere
        assert_eq!(public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41000))), p);
        assert_eq!(
            public_port(&one(&mut c, A1, fwd(A1, 8080, Some(p), 41000))),
            p
        );
        assert_eq!((applies(&c), c.mirror().len()), (n_apply, mlen));
        assert_eq!(c.counters().reused, 2);
        // same public port, new client info: table + mirror only
        assert_eq!(public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41001))), p);
        assert_eq!(applies(&c), n_apply, "kernel untouched");
        assert!(c.mirror().len() > mlen, "mirror appended");
        assert_eq!(
            c.table().get((Transport::Tcp, p)).unwrap().probe_port,
            41001
        );
        assert_eq!(c.counters().updated, 1);
        assert_consistent(&c);
        // a different desired port moves the mapping
        let q = public_port(&one(&mut c, A1, fwd(A1, 8080, Some(20007), 41001)));
        assert_eq!(q, 20007);
        assert_eq!(c.table().len(), 1);
        assert_consistent(&c);
    }

    #[test]
    fn refusals_install_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let p = public_port(&one(&mut c, A2, fwd(A2, 80, Some(20001), 1)));
        let before = (
            c.table().clone(),
            c.mirror().len(),
            c.kernel().elems.clone(),
        );
        let cases = [
            (A1, fwd(A2, 8080, None, 1), ErrorCode::NotOwner),
            (A1, fwd(A1, 8080, Some(30000), 1), ErrorCode::PortRange),
            (A1, fwd(A1, 8080, Some(p), 1), ErrorCode::PortRange),
            (
                [203, 0, 113, 10],
                fwd([203, 0, 113, 10], 8080, None, 1),
                ErrorCode::Unauthorized,
            ),
            (
                [10, 2, 0, 11],
                fwd([10, 2, 0, 11], 8080, None, 1),
                ErrorCode::Unauthorized,
            ),
            (A1, fwd(A1, 0, None, 1), ErrorCode::BadRequest),
            (A1, fwd(A1, 8080, None, 0), ErrorCode::BadRequest),
            (
                A1,
                Body::Heartbeat { proxies: vec![] },
                ErrorCode::Unsupported,
            ),
        ];
        for (from, body, want) in cases {
            let r = one(&mut c, from, body.clone());
            assert_eq!(code(&r), want, "{body:?} -> {r:?}");
            let Body::Error { reason, .. } = &r else {
                unreachable!()
            };
            assert!(!reason.is_empty());
        }
        assert_eq!(
            (
                c.table().clone(),
                c.mirror().len(),
                c.kernel().elems.clone()
            ),
            before
        );
        // quota: 3 per client
        for i in 0..3 {
            public_port(&one(&mut c, A1, fwd(A1, 9000 + i, None, 1)));
        }
        let before = (c.table().clone(), c.mirror().len());
        let r = one(&mut c, A1, fwd(A1, 9100, None, 1));
        assert_eq!(code(&r), ErrorCode::Quota);
        assert_eq!((c.table().clone(), c.mirror().len()), before);
        // ...but re-asking for an existing mapping is fine
        public_port(&one(&mut c, A1, fwd(A1, 9000, None, 1)));
        assert_consistent(&c);
    }

    #[test]
    fn range_exhaustion_and_rate_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg();
        cfg.quota = 100;
        cfg.rate = 1.0;
        cfg.burst = 12.0;
        let (mut c, _) = Core::open(cfg, FakeKernel::new(), dir.path()).unwrap();
        let t = Instant::now();
        let mut ports = Vec::new();
        for i in 0..10 {
            let r = c.handle_batch(t, vec![(IpAddr::from(A1), fwd(A1, 100 + i, None, 1))]);
            ports.push(public_port(&r[0]));
        }
        ports.sort_unstable();
        assert_eq!(ports, (20000..20010).collect::<Vec<_>>());
        let r = c.handle_batch(t, vec![(IpAddr::from(A1), fwd(A1, 200, None, 1))]);
        assert_eq!(code(&r[0]), ErrorCode::PortRange);
        // 12 tokens used (11 requests so far + this one), then busy
        let _ = c.handle_batch(
            t,
            vec![(
                IpAddr::from(A1),
                Body::Query {
                    transport: Transport::Tcp,
                    public: sa([203, 0, 113, 1], 1),
                },
            )],
        );
        let r = c.handle_batch(t, vec![(IpAddr::from(A1), fwd(A1, 100, None, 1))]);
        assert_eq!(code(&r[0]), ErrorCode::Busy);
        // other clients are not affected; the bucket refills
        let r = c.handle_batch(
            t,
            vec![(
                IpAddr::from(A2),
                Body::Delete {
                    transport: Transport::Tcp,
                    private: sa(A2, 1),
                },
            )],
        );
        assert_eq!(r[0], Body::Deleted { epoch: 1 });
        let r = c.handle_batch(
            t + Duration::from_secs(2),
            vec![(IpAddr::from(A1), fwd(A1, 100, None, 1))],
        );
        public_port(&r[0]);
    }

    #[test]
    fn kernel_failure_rolls_back_only_the_failing_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        c.kernel_mut().fail_keys.insert((Transport::Tcp, 20003));
        let r = c.handle_batch(
            Instant::now(),
            vec![
                (IpAddr::from(A1), fwd(A1, 1, Some(20002), 1)),
                (IpAddr::from(A1), fwd(A1, 2, Some(20003), 1)),
                (IpAddr::from(A2), fwd(A2, 3, Some(20004), 1)),
            ],
        );
        assert_eq!(public_port(&r[0]), 20002);
        assert_eq!(code(&r[1]), ErrorCode::Internal);
        assert_eq!(public_port(&r[2]), 20004);
        assert!(c.table().get((Transport::Tcp, 20003)).is_none());
        assert_eq!(c.table().len(), 2);
        assert_consistent(&c);
        assert!(!c.kernel().flushed.contains(&(Transport::Tcp, 20003)));
        assert_eq!(c.counters().rolled_back, 1);
    }

    #[test]
    fn mirror_failure_installs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        c.mirror_mut().fail_appends = true;
        let r = one(&mut c, A1, fwd(A1, 8080, None, 1));
        assert_eq!(code(&r), ErrorCode::Internal);
        assert!(c.table().is_empty());
        assert!(c.kernel().elems.as_ref().unwrap().is_empty());
        c.mirror_mut().fail_appends = false;
        public_port(&one(&mut c, A1, fwd(A1, 8080, None, 1)));
        assert_consistent(&c);
    }

    #[test]
    fn restart_replays_mirror_and_bumps_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        assert_eq!(c.epoch(), 1);
        // a second daemon on the same state directory is refused
        assert!(matches!(
            Core::open(cfg(), FakeKernel::new(), dir.path()),
            Err(CoreError::Locked(_))
        ));
        let p = public_port(&one(&mut c, A1, fwd(A1, 8080, None, 41000)));
        one(&mut c, A1, fwd(A1, 8080, None, 41001)); // reuse record (deprecated one stays)
        one(&mut c, A2, fwd(A2, 53, Some(20009), 1));
        one(
            &mut c,
            A2,
            Body::Delete {
                transport: Transport::Tcp,
                private: sa(A2, 53),
            },
        );
        let table = c.table().clone();
        drop(c); // crash: nothing else happens
                 // a torn record at the tail, as a crash mid-append leaves it
        let path = dir.path().join("mirror");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"0badc0de A tcp 20008 10.1.0.11:1");
        std::fs::write(&path, bytes).unwrap();
        // reboot: empty kernel table
        let mut k = FakeKernel::new();
        k.elems = None;
        let (c, rep) = Core::open(cfg(), k, dir.path()).unwrap();
        assert_eq!(c.epoch(), 2);
        assert_eq!(c.table(), &table);
        assert_eq!(rep.replay.torn_bytes, 32);
        assert!(rep.kernel_replaced);
        assert_eq!(
            c.table().get((Transport::Tcp, p)).unwrap().probe_port,
            41001
        );
        assert_consistent(&c);
        // compacted at open: one record per mapping
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_corrupt_delete_record_does_not_resurrect_the_mapping_in_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
        one(&mut c, A1, fwd(A1, 2, Some(20002), 1));
        one(&mut c, A1, del(A1, 2));
        one(&mut c, A2, fwd(A2, 3, Some(20003), 1));
        // kill -9: the kernel keeps its elements
        let kernel_then = c.kernel().elems.clone();
        drop(c);
        let path = dir.path().join("mirror");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(" D tcp 20002\n"), "{text}");
        std::fs::write(&path, text.replace(" D tcp 20002\n", " D tcp 20003\n")).unwrap();
        let mut k = FakeKernel::new();
        k.elems = kernel_then;
        let (c, rep) = Core::open(cfg(), k, dir.path()).unwrap();
        assert_eq!(rep.replay.bad, 1);
        let kernel = c.kernel().elems.as_ref().unwrap();
        assert!(
            !kernel.contains_key(&(Transport::Tcp, 20002)),
            "resurrected"
        );
        // 20001 was live before the corrupt line: it may have been its target
        assert!(!kernel.contains_key(&(Transport::Tcp, 20001)), "{kernel:?}");
        assert!(kernel.contains_key(&(Transport::Tcp, 20003)), "after it");
        // 20001 and 20002 (whose delete was the corrupt line)
        assert_eq!(c.counters().quarantined, 2);
        assert_consistent(&c);
    }

    #[test]
    fn restart_with_a_narrower_policy_removes_what_it_refuses_from_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        one(&mut c, A1, fwd(A1, 1, Some(20001), 1));
        one(&mut c, A1, fwd(A1, 9, Some(20009), 1));
        one(&mut c, A2, fwd(A2, 2, Some(20002), 1));
        let kernel_then = c.kernel().elems.clone();
        drop(c);
        let mut narrow = cfg();
        narrow.private = "10.1.0.8/30".parse().unwrap(); // a1 (.11) in, a2 (.12) out
        narrow.ports = "20000-20005".parse().unwrap();
        let mut k = FakeKernel::new();
        k.elems = kernel_then;
        let (c, rep) = Core::open(narrow.clone(), k, dir.path()).unwrap();
        let keys: Vec<u16> = c.table().iter().map(|(k, _)| k.1).collect();
        assert_eq!(keys, vec![20001]);
        assert_eq!(rep.replay.quarantined.len(), 2);
        assert_eq!(
            c.kernel().elems.as_ref().unwrap(),
            &c.table().kernel_elements(),
            "kernel == table"
        );
        assert_eq!(mirror_table(&c), *c.table(), "compacted away");
    }

    #[test]
    fn sync_repairs_kernel_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        for i in 0..3 {
            one(&mut c, A1, fwd(A1, 100 + i, None, 1));
            one(&mut c, A1, fwd(A1, 100 + i, None, 2)); // deprecated records
        }
        let grown = c.mirror().len();
        // operator flushed the table
        c.kernel_mut().elems = None;
        let rep = c.sync(Instant::now());
        assert!(rep.kernel_replaced);
        assert!(c.mirror().len() < grown, "compacted");
        assert_consistent(&c);
        // an element deleted by hand and a stray one added by hand
        let k = c.kernel_mut().elems.as_mut().unwrap();
        let first = *k.keys().next().unwrap();
        k.remove(&first);
        k.insert((Transport::Udp, 20005), "10.1.0.12:9".parse().unwrap());
        let rep = c.sync(Instant::now());
        assert_eq!(
            (rep.kernel_added, rep.kernel_removed, rep.kernel_replaced),
            (1, 1, false)
        );
        assert_consistent(&c);
        // nothing to do
        let rep = c.sync(Instant::now());
        assert_eq!(
            (rep.kernel_added, rep.kernel_removed, rep.table_fixed),
            (0, 0, 0)
        );
    }

    #[test]
    fn missing_kernel_table_during_add_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        one(&mut c, A1, fwd(A1, 1, None, 1));
        c.kernel_mut().elems = None; // deleted by hand
        public_port(&one(&mut c, A1, fwd(A1, 2, None, 1)));
        assert_eq!(c.kernel().elems.as_ref().unwrap().len(), 2);
        assert_consistent(&c);
    }

    #[test]
    fn probes_remove_dead_clients() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let t0 = Instant::now();
        one(&mut c, A1, fwd(A1, 1, None, 41000));
        one(
            &mut c,
            A1,
            Body::Forward {
                transport: Transport::Udp,
                private: sa(A1, 1),
                desired_public_port: None,
                probe_port: 41000,
            },
        );
        one(&mut c, A2, fwd(A2, 2, None, 42000));
        one(&mut c, A2, fwd(A2, 3, None, 42001));
        let mut targets = c.probe_targets();
        targets.sort();
        assert_eq!(targets.len(), 3, "one probe per management socket");
        let m1: SocketAddrV4 = "10.1.0.11:41000".parse().unwrap();
        let m2: SocketAddrV4 = "10.1.0.12:42000".parse().unwrap();
        let m3: SocketAddrV4 = "10.1.0.12:42001".parse().unwrap();
        let started = Instant::now();
        // refused: both of m1's mappings go at once
        let removed = c.apply_probe_results(
            started,
            &[
                (m1, ProbeOutcome::Refused),
                (m2, ProbeOutcome::Alive),
                (m3, ProbeOutcome::Failed),
            ],
        );
        assert_eq!(removed.len(), 2);
        assert_eq!(c.table().len(), 2);
        assert_consistent(&c);
        // a timeout needs probe_failures (2) rounds in a row
        let removed = c.apply_probe_results(
            Instant::now(),
            &[(m2, ProbeOutcome::Alive), (m3, ProbeOutcome::Failed)],
        );
        assert_eq!(removed.len(), 1);
        assert_consistent(&c);
        // a mapping made after the round started is left alone
        one(&mut c, A1, fwd(A1, 5, None, 41000));
        let removed = c.apply_probe_results(t0, &[(m1, ProbeOutcome::Refused)]);
        assert!(removed.is_empty());
        assert_eq!(c.table().len(), 2);
    }

    #[test]
    fn query_is_answered_from_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path());
        let p = public_port(&one(&mut c, A1, fwd(A1, 8080, None, 1)));
        let q = |port| Body::Query {
            transport: Transport::Tcp,
            public: sa([203, 0, 113, 1], port),
        };
        assert_eq!(
            one(&mut c, A2, q(p)),
            Body::QueryResult {
                private: Some(sa(A1, 8080)),
                epoch: 1
            }
        );
        assert_eq!(
            one(&mut c, A2, q(p + 1)),
            Body::QueryResult {
                private: None,
                epoch: 1
            }
        );
        let other = Body::Query {
            transport: Transport::Tcp,
            public: sa([203, 0, 113, 2], p),
        };
        assert_eq!(
            one(&mut c, A2, other),
            Body::QueryResult {
                private: None,
                epoch: 1
            }
        );
        let udp = Body::Query {
            transport: Transport::Udp,
            public: sa([203, 0, 113, 1], p),
        };
        assert_eq!(
            one(&mut c, A2, udp),
            Body::QueryResult {
                private: None,
                epoch: 1
            }
        );
        let r = one(&mut c, [203, 0, 113, 10], q(p));
        assert_eq!(code(&r), ErrorCode::Unauthorized);
    }
}
