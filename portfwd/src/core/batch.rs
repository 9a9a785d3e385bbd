//! Committing a batch: the plans of requests that arrived together go to
//! the mirror file (one append, one fdatasync), the kernel (one
//! transaction; on failure one per request), conntrack (ports handed to a
//! new holder), and the mirror again (deletions), with rollback of what
//! fails (module docs of [`crate::core`]).

use std::net::IpAddr;
use std::time::Instant;

use gcb_proto::{Body, ErrorCode};

use super::plan::{Plan, PlanKind};
use super::{tname, Core};
use crate::kernel::{KernelBackend, Op};
use crate::mirror::Record;
use crate::table::Key;

impl<K: KernelBackend> Core<K> {
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
            p.reply = Some(Body::error(ErrorCode::Internal, why));
        };

        // Mirror first (adds and client-info updates), one fdatasync.
        let pre: Vec<Record> = plans.iter().flat_map(|p| p.pre.iter().copied()).collect();
        if let Err(e) = self.mirror.append(&pre) {
            self.counters.mirror_errors += 1;
            tracing::error!("mirror file {}: {e}", self.mirror.path().display());
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
            tracing::warn!(
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
                    tracing::warn!("conntrack flush of {} ports: {e}", flush.len());
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
            tracing::error!(
                "mirror file {}: recording {} deletions: {e}",
                self.mirror.path().display(),
                post.len()
            );
        }

        let mut replies = Vec::with_capacity(plans.len());
        for (p, f) in plans.into_iter().zip(failed) {
            let reply = p
                .reply
                .unwrap_or_else(|| Body::error(ErrorCode::Internal, "no reply"));
            match (&reply, f) {
                (Body::Error { code, reason }, _) => {
                    self.counters.refused += 1;
                    tracing::warn!("refused: {code}: {reason}");
                }
                (Body::Forwarded { public, .. }, false) => match p.kind {
                    PlanKind::Added => {
                        self.counters.added += 1;
                        if let Some(Op::Add(k, a)) = p.ops.last() {
                            self.born.insert(*k, now);
                            tracing::info!("added {}/{} -> {a}", public, tname(k.0));
                        }
                    }
                    PlanKind::Updated => self.counters.updated += 1,
                    _ => self.counters.reused += 1,
                },
                (Body::Deleted { .. }, false) if p.kind == PlanKind::Deleted => {
                    self.counters.deleted += 1;
                    if let Some(Op::Del(k)) = p.ops.first() {
                        self.born.remove(k);
                        tracing::info!("deleted {}:{}/{}", self.cfg.public, k.1, tname(k.0));
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
                    tracing::warn!(
                        "kernel table was missing or modified: re-created with {} mappings",
                        want.len()
                    );
                    return;
                }
            }
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!("cannot list the kernel table: {e}"),
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
                        tracing::error!("mirror rollback: {me}");
                    }
                }
                plan.reply = Some(Body::error(
                    ErrorCode::Internal,
                    format!("cannot install the forwarding rule: {e}"),
                ));
            }
        }
    }
}
