//! The state directory and the sync: [`Core::open`] (lock, epoch, mirror
//! replay under today's policy, kernel table made equal to it, conntrack
//! listing) and [`Core::sync`] after each probe round (mirror replayed,
//! table made equal to it, file compacted, kernel table made equal).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::path::Path;
use std::time::Instant;

use super::{Core, CoreConfig, CoreError, Counters, SyncReport, EPOCH_FILE, LOCK_FILE};
use crate::kernel::{Elements, KernelBackend, KernelError, Op};
use crate::mirror::{write_atomic, Mirror};
use crate::policy::RateLimiter;
use crate::table::Key;

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
    /// table match it. Returns the core and what the replay found. `now` is
    /// the start: restored mappings count as made then (a probe round that
    /// started earlier leaves them alone).
    pub fn open(
        cfg: CoreConfig,
        kernel: K,
        dir: &Path,
        now: Instant,
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
        let (mirror, table, replay) = Mirror::open(dir, cfg.policy()).map_err(st("open mirror"))?;
        // Before the kernel is touched: what is quarantined is named first.
        replay.log();
        let born = table.iter().map(|(k, _)| (k, now)).collect();
        let mut core = Core {
            next_port: cfg.ports.lo,
            rates: RateLimiter::new(cfg.rate, cfg.burst),
            table,
            mirror,
            kernel,
            epoch,
            born,
            last_holder: HashMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            failures: HashMap::new(),
            cfg,
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
                tracing::warn!(
                    "listing conntrack entries: {e}; every port handed out is flushed until a listing works"
                );
            }
        }
    }

    /// Synchronizes the three representations from the mirror file (see
    /// module docs). Also forgets idle rate-limit state. `now` is the time of
    /// the sync: mappings the mirror file brings back count as made then.
    pub fn sync(&mut self, now: Instant) -> SyncReport {
        self.rates.forget_idle(now);
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
                    tracing::warn!(
                        "mapping table differed from the mirror file in {} mappings: reloaded",
                        report.table_fixed
                    );
                    for (k, _) in a.iter().filter(|(k, v)| b.get(k) != Some(v)) {
                        self.dirty.insert(*k);
                    }
                    self.born.retain(|k, _| mtable.get(*k).is_some());
                    for (k, _) in mtable.iter() {
                        self.born.entry(k).or_insert(now);
                    }
                    self.table = mtable;
                }
                if let Err(e) = self.mirror.compact(&self.table) {
                    self.counters.mirror_errors += 1;
                    tracing::error!("compacting the mirror file: {e}");
                }
            }
            Err(e) => {
                self.counters.mirror_errors += 1;
                tracing::error!("reading the mirror file: {e}");
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
                tracing::error!("kernel sync: {e}");
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
                    tracing::warn!("kernel reconcile failed ({e}); re-creating the table");
                    self.kernel.replace_all(&want)?;
                    r.kernel_replaced = true;
                }
                self.counters.kernel_repairs += 1;
                tracing::warn!(
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
                tracing::info!("kernel table created with {} mappings", want.len());
            }
        }
        Ok(r)
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
