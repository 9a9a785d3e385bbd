//! SIGHUP's reload (see the module docs of [`super`]): apply a new configuration to the
//! running server and say what changed.

use super::*;

impl<K: KernelBackend> Server<K> {
    /// Applies a reload (module docs): `cfg` to the server, `core`'s quota, rate, burst
    /// and probe failures to the core. Says what changed; what needs a restart is
    /// reported and not applied. Never removes a mapping.
    pub fn reconfigure(&mut self, cfg: Config, core: &CoreConfig) -> Changes {
        let mut ch = Changes::default();
        let (old, oc) = (&self.cfg, self.core.config());
        if old.listen != cfg.listen {
            ch.need_restart
                .push(format!("listen {}->{}", old.listen, cfg.listen));
        }
        if oc.public != core.public {
            ch.need_restart
                .push(format!("public {}->{}", oc.public, core.public));
        }
        if oc.private != core.private {
            ch.need_restart
                .push(format!("private {}->{}", oc.private, core.private));
        }
        if oc.ports != core.ports {
            ch.need_restart
                .push(format!("ports {}->{}", oc.ports, core.ports));
        }
        if old.key != cfg.key {
            ch.applied.push(
                match (&old.key, &cfg.key) {
                    (None, Some(_)) => "pool key set (was --insecure)",
                    (Some(_), None) => "pool key removed (--insecure)",
                    _ => "pool key changed",
                }
                .to_owned(),
            );
            self.ep.set_key(cfg.key.clone());
        }
        if old.lan_ifs != cfg.lan_ifs {
            ch.applied.push(format!(
                "lan interfaces {}->{}",
                old.lan_ifs.join(","),
                cfg.lan_ifs.join(",")
            ));
            self.lan_by_index.clear();
            self.warned_ifs.clear();
        }
        let mut diff = |name: &str, a: String, b: String| {
            if a != b {
                ch.applied.push(format!("{name} {a}->{b}"));
            }
        };
        diff(
            "probe_interval",
            format!("{:?}", old.probe_interval),
            format!("{:?}", cfg.probe_interval),
        );
        diff(
            "probe_timeout",
            format!("{:?}", old.probe_timeout),
            format!("{:?}", cfg.probe_timeout),
        );
        diff(
            "probe_concurrency",
            old.probe_concurrency.to_string(),
            cfg.probe_concurrency.to_string(),
        );
        diff(
            "stats_interval",
            format!("{:?}", old.stats_interval),
            format!("{:?}", cfg.stats_interval),
        );
        diff("quota", oc.quota.to_string(), core.quota.to_string());
        diff("rate", oc.rate.to_string(), core.rate.to_string());
        diff("burst", oc.burst.to_string(), core.burst.to_string());
        diff(
            "probe_failures",
            oc.probe_failures.to_string(),
            core.probe_failures.to_string(),
        );
        let t = Instant::now();
        if old.stats_interval != cfg.stats_interval {
            self.next_stats = cfg.stats_interval.map(|d| t + d);
        }
        if old.probe_interval != cfg.probe_interval && self.round.is_none() {
            self.next_round = t + cfg.probe_interval;
        }
        self.core.set_limits(core);
        let listen = self.cfg.listen;
        self.cfg = cfg;
        // The socket stays where it is bound.
        self.cfg.listen = listen;
        ch
    }
}
