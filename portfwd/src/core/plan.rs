//! Planning one request: the policy checks ([`crate::policy`]), the public
//! port chosen, and the table changed at once (so later requests of the
//! same batch see it); the result is a [`Plan`] saying what committing it
//! takes (reply, mirror records before and after the kernel, kernel ops,
//! conntrack flushes) and how to undo it. [`Core::handle_batch`] commits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use gcb_proto::{Body, ErrorCode, Transport};

use super::{tname, Core};
use crate::kernel::{KernelBackend, Op};
use crate::mirror::Record;
use crate::policy::Refusal;
use crate::table::{Entry, Key};

/// How to take back one table change of a plan.
#[derive(Debug)]
pub(super) enum Undo {
    Remove(Key),
    Restore(Key, Entry),
}

/// What committing one request takes (the table is already changed).
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The answer if the commit succeeds (a refusal: the only field set).
    pub(super) reply: Option<Body>,
    /// Mirror records written before the kernel (adds, client-info updates).
    pub(super) pre: Vec<Record>,
    /// Mirror records written after the kernel (deletions).
    pub(super) post: Vec<Record>,
    /// Kernel ops (one nft transaction with the batch's others).
    pub(super) ops: Vec<Op>,
    /// The table changes to take back, in order of making.
    pub(super) undo: Vec<Undo>,
    /// Ports handed to a new holder: their old conntrack flows go.
    pub(super) flush: Vec<Key>,
    /// What it did, for counters and the log.
    pub(super) kind: PlanKind,
}

/// What a committed plan did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum PlanKind {
    #[default]
    None,
    Added,
    Updated,
    Reused,
    Deleted,
}

impl Plan {
    /// A plan that only answers (a refusal, a query): nothing to commit.
    pub(super) fn reply(body: Body) -> Plan {
        Plan {
            reply: Some(body),
            ..Plan::default()
        }
    }
}

impl<K: KernelBackend> Core<K> {
    /// The policy checks every request passes first ([`crate::policy`]):
    /// the client the source speaks for, its ownership of `private`, its
    /// rate. Returns the client and, if given, `private` as IPv4.
    fn admit(
        &mut self,
        now: Instant,
        from: IpAddr,
        private: Option<SocketAddr>,
    ) -> Result<(Ipv4Addr, Option<SocketAddrV4>), Refusal> {
        let policy = self.cfg.policy();
        let src = policy.client(from)?;
        let private = private.map(|p| policy.owned(src, p)).transpose()?;
        if !self.rates.allow(now, src) {
            self.counters.rate_limited += 1;
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "rate limit: {src} sends more than {} requests/s; retry later",
                    self.cfg.rate
                ),
            ));
        }
        Ok((src, private))
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

    /// Plans one request against the table (changing the table, which
    /// [`Core::undo`] restores) and says what committing it takes. A
    /// refusal is a plan with only a reply.
    pub(super) fn plan(&mut self, now: Instant, from: IpAddr, body: Body) -> Plan {
        let planned = match body {
            Body::Forward {
                transport,
                private,
                desired_public_port,
                probe_port,
            } => self.plan_forward(
                now,
                from,
                transport,
                private,
                desired_public_port,
                probe_port,
            ),
            Body::Delete { transport, private } => self.plan_delete(now, from, transport, private),
            Body::Query { transport, public } => self.plan_query(now, from, transport, public),
            other => Err(Refusal::new(
                ErrorCode::Unsupported,
                format!(
                    "gcb-portfwd answers forward, delete and query, not {}",
                    other.type_name()
                ),
            )),
        };
        planned.unwrap_or_else(|r| Plan::reply(r.into()))
    }

    fn plan_forward(
        &mut self,
        now: Instant,
        from: IpAddr,
        t: Transport,
        private: SocketAddr,
        desired_public_port: Option<u16>,
        probe_port: u16,
    ) -> Result<Plan, Refusal> {
        let epoch = self.epoch;
        let (src, private) = self.admit(now, from, Some(private))?;
        let private = private.expect("admitted with a private address");
        let policy = self.cfg.policy();
        let desired = policy.forward_ports(probe_port, desired_public_port)?;
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
                return Ok(Plan {
                    reply,
                    kind: PlanKind::Reused,
                    ..Plan::default()
                });
            }
            self.table.insert(key, entry);
            return Ok(Plan {
                reply,
                pre: vec![Record::Add(key, entry)],
                undo: vec![Undo::Restore(key, old)],
                kind: PlanKind::Updated,
                ..Plan::default()
            });
        }
        policy.quota(
            src,
            self.table.count_of(src) - usize::from(existing.is_some()),
        )?;
        let port = match desired {
            Some(d) => {
                if let Some(other) = self.table.get((t, d)) {
                    return Err(Refusal::new(
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
            None => self.allocate(t, private.port()).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::PortRange,
                    format!("no free {} port in the range {}", tname(t), self.cfg.ports),
                )
            })?,
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
        Ok(plan)
    }

    fn plan_delete(
        &mut self,
        now: Instant,
        from: IpAddr,
        t: Transport,
        private: SocketAddr,
    ) -> Result<Plan, Refusal> {
        let (_, private) = self.admit(now, from, Some(private))?;
        let private = private.expect("admitted with a private address");
        let reply = Some(Body::Deleted { epoch: self.epoch });
        let Some(p) = self.table.public_of(t, private) else {
            // Idempotent: nothing mapped is what the client wants.
            return Ok(Plan {
                reply,
                ..Plan::default()
            });
        };
        let key = (t, p);
        let old = self.table.remove(key).expect("indexed");
        // Its flows stay (they may be the client's own) until the port goes to
        // another holder.
        self.dirty.insert(key);
        Ok(Plan {
            reply,
            ops: vec![Op::Del(key)],
            post: vec![Record::Del(key)],
            undo: vec![Undo::Restore(key, old)],
            kind: PlanKind::Deleted,
            ..Plan::default()
        })
    }

    fn plan_query(
        &mut self,
        now: Instant,
        from: IpAddr,
        t: Transport,
        public: SocketAddr,
    ) -> Result<Plan, Refusal> {
        self.admit(now, from, None)?;
        self.counters.queries += 1;
        let private = match public {
            SocketAddr::V4(p) if *p.ip() == self.cfg.public => self
                .table
                .get((t, p.port()))
                .map(|e| SocketAddr::V4(e.private)),
            _ => None,
        };
        Ok(Plan::reply(Body::QueryResult {
            private,
            epoch: self.epoch,
            public_ip: Some(IpAddr::V4(self.cfg.public)),
        }))
    }

    /// Undoes a plan's table changes; returns the compensating mirror records.
    pub(super) fn undo(&mut self, plan: &Plan) -> Vec<Record> {
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
}
