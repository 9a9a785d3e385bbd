//! The daemon's state machine: the three representations (mapping table,
//! mirror file, kernel table) kept consistent in the paper's orders, under
//! the request policy ([`crate::policy`]: ownership, range, quota, rate),
//! liveness results and the sync. No sockets and no clock reads here: the
//! server feeds it requests and probe results with the time they happened
//! (`now`), so tests drive it with a clock of their own.
//!
//! ## Where each part lives
//!
//! * this module: [`Core`], its configuration, counters and accessors;
//! * `plan`: one request against the table (policy checks, port
//!   allocation), giving its reply, mirror records, kernel ops and undo;
//! * `batch`: [`Core::handle_batch`] commits the plans of requests that
//!   arrived together (mirror, kernel, conntrack, mirror), with rollback;
//! * `probe`: [`Core::apply_probe_results`], liveness;
//! * `sync`: [`Core::open`] and [`Core::sync`], the state directory and the
//!   three representations made equal;
//! * `tests`: the unit tests, on [`crate::kernel::FakeKernel`].
//!
//! Those submodules only add `impl Core` blocks and name this module, never
//! the reverse, so the module graph has no cycle (`scripts/modgraph --check
//! portfwd/src`).
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

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Instant;

use gcb_proto::Transport;
use ipnet::Ipv4Net;

use crate::kernel::{KernelBackend, KernelError};
use crate::mirror::{Mirror, Replay};
use crate::policy::{Policy, PortRange, RateLimiter};
use crate::table::{Key, Table};

mod batch;
mod plan;
mod probe;
mod sync;
#[cfg(test)]
mod tests;

/// File holding the epoch in the state directory.
pub const EPOCH_FILE: &str = "epoch";
/// Lock file in the state directory (one daemon per state directory).
pub const LOCK_FILE: &str = "lock";

/// Policy and addresses.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The gateway's public address (what clients are told: `--advertise`, else
    /// `--public`; the kernel rules match `--public`, see [`crate::kernel::NftKernel`]).
    pub public: Ipv4Addr,
    /// The private network: requests only from here, targets only here.
    pub private: Ipv4Net,
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
    rates: RateLimiter,
    counters: Counters,
    _lock: File,
}

fn tname(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

impl CoreConfig {
    /// Who may forward what ([`crate::policy`]): requests and replayed
    /// mappings are both checked against it.
    pub fn policy(&self) -> Policy {
        Policy {
            private: self.private,
            ports: self.ports,
            quota: self.quota,
        }
    }
}

impl<K: KernelBackend> Core<K> {
    /// Applies a reload's `quota`, `rate`, `burst` and `probe_failures` (the others of
    /// `cfg` need a restart and are ignored): they bind the next requests and probe
    /// rounds; mappings beyond a lowered quota stay until deleted.
    pub fn set_limits(&mut self, cfg: &CoreConfig) {
        if (cfg.rate, cfg.burst) != (self.cfg.rate, self.cfg.burst) {
            self.rates = RateLimiter::new(cfg.rate, cfg.burst);
        }
        self.cfg.quota = cfg.quota;
        self.cfg.rate = cfg.rate;
        self.cfg.burst = cfg.burst;
        self.cfg.probe_failures = cfg.probe_failures;
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

    /// When the mapping `key` was added by a request of this run (not known for
    /// mappings replayed from the mirror file at start).
    pub fn born(&self, key: Key) -> Option<Instant> {
        self.born.get(&key).copied()
    }

    /// Probe rounds in a row the management socket `target` failed (0: answered last
    /// time, or not probed yet).
    pub fn probe_failures(&self, target: SocketAddrV4) -> u32 {
        self.failures.get(&target).copied().unwrap_or(0)
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Tokens in a client's rate-limit bucket as of its last request (tests).
    pub fn rate_state(&self, ip: Ipv4Addr) -> Option<f64> {
        self.rates.tokens(ip)
    }
}
