//! The operator's view of the server: the stats line's counters, the status document,
//! and the admin socket and metrics endpoint ([`gcb_ops`]) served from the event loop.

use super::*;

impl<K: KernelBackend> Server<K> {
    /// The stats line's counters and gauges, by name, in its order (the status document's
    /// `counters` and the metrics come from here too).
    pub fn counter_list(&self) -> Vec<(&'static str, u64)> {
        let c = self.core.counters();
        let s = self.ep.stats();
        vec![
            ("mappings", self.core.table().len() as u64),
            ("epoch", self.core.epoch()),
            ("requests", self.counters.requests),
            ("batches", self.counters.batches),
            ("added", c.added),
            ("reused", c.reused),
            ("updated", c.updated),
            ("deleted", c.deleted),
            ("queries", c.queries),
            ("refused", c.refused),
            ("rate_limited", c.rate_limited),
            ("rolled_back", c.rolled_back),
            ("probe_rounds", self.counters.probe_rounds),
            ("probes_ok", c.probes_ok),
            ("probes_refused", c.probes_refused),
            ("probes_failed", c.probes_failed),
            ("removed_by_probe", c.removed_by_probe),
            ("kernel_repairs", c.kernel_repairs),
            ("conntrack_flushed", c.conntrack_flushed),
            ("conntrack_skipped", c.conntrack_skipped),
            ("quarantined", c.quarantined),
            ("mirror_errors", c.mirror_errors),
            ("kernel_errors", c.kernel_errors),
            ("datagrams_received", s.received),
            ("junk_datagrams", s.malformed + s.rejected_total()),
            ("error_replies", s.error_replies),
            (
                "duplicates",
                s.duplicates_answered_from_cache + s.duplicates_pending,
            ),
            (
                "dropped_wrong_interface",
                self.counters.dropped_wrong_interface,
            ),
        ]
    }

    /// Logs the stats line.
    pub fn log_stats(&self) {
        tracing::info!("stats {}", stats_line(&self.counter_list()));
    }

    /// Opens the admin socket at `admin` and the metrics listener on `metrics` (either
    /// optional), served from the event loop from now on.
    pub fn open_ops(
        &mut self,
        admin: Option<&std::path::Path>,
        metrics: Option<SocketAddr>,
    ) -> Result<(), OpsError> {
        self.ops.open(admin, metrics, self.poll.registry())
    }

    /// The operator's sockets, if opened.
    pub fn ops(&self) -> Option<&Ops> {
        self.ops.get()
    }

    /// The status document of this moment ([`crate::status`]).
    pub fn status(&self) -> Status {
        let now = Instant::now();
        let core = &self.core;
        let limit = core.config().probe_failures;
        let public = core.config().public;
        let mappings = core
            .table()
            .iter()
            .map(|(key, e)| {
                let probe = SocketAddrV4::new(e.owner(), e.probe_port);
                let failures = core.probe_failures(probe);
                MappingStatus {
                    proto: match key.0 {
                        gcb_proto::Transport::Tcp => "tcp",
                        gcb_proto::Transport::Udp => "udp",
                    }
                    .to_owned(),
                    public: SocketAddrV4::new(public, key.1).to_string(),
                    private: e.private.to_string(),
                    probe: probe.to_string(),
                    age_secs: core
                        .born(key)
                        .map(|b| now.saturating_duration_since(b).as_secs_f64()),
                    probe_failures: failures,
                    probe_state: if failures == 0 {
                        "ok".to_owned()
                    } else {
                        format!("failing {failures}/{limit}")
                    },
                }
            })
            .collect();
        Status {
            about: DaemonInfo::this_process(
                "gcb-portfwd",
                env!("CARGO_PKG_VERSION"),
                now.saturating_duration_since(self.started),
                self.addr.to_string(),
            ),
            public: public.to_string(),
            epoch: core.epoch(),
            mappings,
            install_seconds: self.installs.clone(),
            counters: counters_json(self.counter_list()),
        }
    }

    pub(super) fn on_ops(&mut self, t: Token) {
        let mut ops = self.ops.take();
        if let Some(ops) = ops.as_mut() {
            ops.ready(
                t,
                self.poll.registry(),
                Instant::now(),
                &mut |req: Request| {
                    gcb_ops::answer(req, &self.status(), |doc| {
                        crate::metrics::render(doc, &self.install_seconds)
                    })
                },
            );
        }
        self.ops.put(ops);
    }
}
