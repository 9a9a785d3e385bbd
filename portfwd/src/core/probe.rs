//! Liveness: a probe round's results remove the mappings of management
//! sockets that refused, or that failed `probe_failures` rounds in a row
//! (table, kernel, mirror).

use std::net::SocketAddrV4;
use std::time::Instant;

use super::{tname, Core, ProbeOutcome};
use crate::kernel::{KernelBackend, Op};
use crate::mirror::Record;
use crate::table::Key;

impl<K: KernelBackend> Core<K> {
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
                        tracing::info!(
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
                tracing::info!(
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
            tracing::warn!("removing {} dead mappings from the kernel: {e}", ops.len());
        }
        let recs: Vec<Record> = removed.iter().map(|k| Record::Del(*k)).collect();
        if let Err(e) = self.mirror.append(&recs) {
            self.counters.mirror_errors += 1;
            tracing::error!("mirror file: recording {} removals: {e}", recs.len());
        }
        removed
    }
}
