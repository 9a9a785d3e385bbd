//! Signals and lifecycle: what the loop does on SIGUSR1 (the stats line), SIGHUP (stop
//! so that `main` resolves the configuration again and hands it to
//! [`Server::reconfigure`]) and SIGTERM/SIGINT (drain, then exit).
//!
//! ## Reload
//!
//! Everything [`Config`] holds applies live but `listen` and `proxy_ips` (the sockets
//! stay bound; a changed one is reported as needing a restart). Nothing running is dropped: relays,
//! pairings, standbys and registrations stay; lowered caps bind new admissions only.
//! A new pool key takes over at once: every control datagram must be sealed with it and
//! every token is derived from it. Registrations made with the old key stay until their
//! lease runs out, but their owners' heartbeats (still sealed with the old key) are
//! refused, so they lapse within one lease unless their programs are restarted with the
//! new key file (the shim reads it at start). Relays in flight carry no key and run on.
//!
//! ## Drain
//!
//! The first SIGTERM stops taking work: the relay port and every TCP proxy are closed
//! (new connections are refused by the kernel), `register`, `connect_request` and
//! `punch_request` are answered `error{busy}` (the shim then serves locally or goes
//! elsewhere). Relays already spliced, and claimed standbys about to become relays, run
//! on until they end or `drain_grace` passes; then the broker resets what is left (an
//! RST, so that no receiver mistakes a cut transfer for a complete one), logs the stats
//! line and exits. A second SIGTERM exits at once. UDP proxies keep relaying until exit.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gcb_proto::token::OwnerSecret;
use tracing::info;

use crate::iplimits::RateLimiter;
use crate::registry::Limits;
use crate::relay::RelayState;
use crate::udprules::RuleLimits;

use super::config::Config;
use super::state::{Drain, Server};

pub use gcb_ops::lifecycle::{Changes, RunEnd, Signals};

impl Server {
    /// Acts on the signals: returns `Some` when the loop must stop.
    pub(super) fn on_signals(&mut self, signals: &Signals) -> Option<RunEnd> {
        if signals.stats.swap(false, Ordering::Relaxed) {
            self.log_stats();
        }
        let terms = signals.terminate.load(Ordering::Relaxed);
        match self.drain {
            None if terms > 0 => {
                if terms > 1 {
                    info!(
                        "told to stop twice: exiting now, resetting {} relays",
                        self.relays.len()
                    );
                    self.reset_relays("the broker stopped");
                    return Some(RunEnd::Exit);
                }
                self.start_drain(terms);
            }
            Some(d) if terms > d.terms => {
                info!(
                    "told to stop again while draining: exiting now, resetting {} relays",
                    self.relays.len()
                );
                self.reset_relays("the broker stopped");
                return Some(RunEnd::Exit);
            }
            _ => {}
        }
        if let Some(d) = self.drain {
            if self.relays.is_empty() && self.claims.is_empty() {
                info!("drained: no relay left");
                return Some(RunEnd::Exit);
            }
            if self.now().mono >= d.started + self.cfg.drain_grace {
                info!(
                    "drain grace period ({} s) over: resetting {} relays",
                    self.cfg.drain_grace.as_secs(),
                    self.relays.len()
                );
                self.reset_relays("drain grace period over");
                return Some(RunEnd::Exit);
            }
        }
        if signals.reload.swap(false, Ordering::Relaxed) {
            return Some(RunEnd::Reload);
        }
        None
    }

    /// Whether the broker is draining (new registrations and connections refused).
    pub fn draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Stops taking new work (module docs).
    fn start_drain(&mut self, terms: usize) {
        self.drain = Some(Drain {
            started: self.now().mono,
            terms,
        });
        if let Some(mut l) = self.relay_listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        for (_, (token, mut l)) in self.proxies.drain() {
            let _ = self.poll.registry().deregister(&mut l);
            self.owners.remove(&token);
        }
        info!(
            "draining: relay port and proxies closed, new registrations and connections refused; \
             {} relays open, waiting up to {} s for them (stop again to exit now)",
            self.relays.len() + self.claims.len(),
            self.cfg.drain_grace.as_secs()
        );
    }

    /// Resets every relay still open.
    fn reset_relays(&mut self, why: &str) {
        let rids: Vec<usize> = self.relays.keys().copied().collect();
        for rid in rids {
            if let Some(e) = self.relays.get_mut(&rid) {
                e.relay.abort();
                self.finish_relay(rid, RelayState::Reset(why.to_owned()));
            }
        }
    }

    /// Applies a new configuration to the running broker (module docs) and says what
    /// changed. Never drops a relay or a registration.
    pub fn reconfigure(&mut self, new: Config) -> Changes {
        let mut ch = Changes::default();
        let old = &self.cfg;
        macro_rules! diff {
            ($($field:ident),* $(,)?) => {$(
                if old.$field != new.$field {
                    ch.applied.push(format!(
                        "{} {}->{}",
                        stringify!($field),
                        Shown(&old.$field),
                        Shown(&new.$field)
                    ));
                }
            )*};
        }
        if old.listen != new.listen {
            ch.need_restart
                .push(format!("listen {}->{}", old.listen, new.listen));
        }
        if old.proxy_ips != new.proxy_ips {
            let list = |v: &[std::net::IpAddr]| {
                let v: Vec<String> = v.iter().map(|ip| ip.to_string()).collect();
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.join(",")
                }
            };
            ch.need_restart.push(format!(
                "proxy_ip {}->{}",
                list(&old.proxy_ips),
                list(&new.proxy_ips)
            ));
        }
        let key_changed = old.key != new.key;
        if key_changed {
            ch.applied.push(
                match (&old.key, &new.key) {
                    (None, Some(_)) => "pool key set (was --insecure)",
                    (Some(_), None) => "pool key removed (--insecure)",
                    _ => "pool key changed",
                }
                .to_owned(),
            );
        }
        if old.allow.0 != new.allow.0 {
            let list = |a: &crate::allow::AllowList| {
                let v: Vec<String> = a.0.iter().map(|c| c.to_string()).collect();
                if v.is_empty() {
                    "any".to_owned()
                } else {
                    v.join(",")
                }
            };
            ch.applied
                .push(format!("allow {}->{}", list(&old.allow), list(&new.allow)));
        }
        diff!(
            max_registrations,
            max_registrations_per_ip,
            max_relays,
            max_relays_per_ip,
            max_pending_per_proxy,
            max_pending_per_ip,
            max_preambles,
            max_preambles_per_ip,
            control_rate_per_ip,
            control_burst_per_ip,
            relay_idle,
            lease,
            connect_timeout,
            preamble_timeout,
            stats_interval,
            udp_rule_idle,
            max_udp_rules,
            max_udp_rules_per_proxy,
            max_udp_rules_per_sender_ip,
            proxy_reserve,
            drain_grace,
        );
        let rate_changed = old.control_rate_per_ip != new.control_rate_per_ip
            || old.control_burst_per_ip != new.control_burst_per_ip;
        let stats_changed = old.stats_interval != new.stats_interval;
        if key_changed {
            self.ep.set_key(new.key.clone());
            self.owner = match &new.key {
                Some(k) => OwnerSecret::from_pool_key(k),
                None => {
                    let mut b = [0u8; 32];
                    self.random.fill(&mut b);
                    OwnerSecret::from_random(b)
                }
            };
        }
        self.registry.set_limits(Limits {
            max_total: new.max_registrations,
            max_per_ip: new.max_registrations_per_ip,
            lease: new.lease,
        });
        self.udp.rules.set_limits(RuleLimits {
            idle: new.udp_rule_idle,
            max_total: new.max_udp_rules,
            max_per_proxy: new.max_udp_rules_per_proxy,
            max_per_sender_ip: new.max_udp_rules_per_sender_ip,
        });
        if rate_changed {
            self.control_rate =
                RateLimiter::new(new.control_rate_per_ip, new.control_burst_per_ip, 65_536);
        }
        if stats_changed {
            self.next_stats = new.stats_interval.map(|d| self.now().mono + d);
        }
        let listen = self.cfg.listen;
        let proxy_ips = std::mem::take(&mut self.cfg.proxy_ips);
        self.cfg = new;
        // The sockets stay where they are bound; the proxy IPs were checked against them.
        self.cfg.listen = listen;
        self.cfg.proxy_ips = proxy_ips;
        ch
    }

    /// Runs until a signal says otherwise (see [`RunEnd`]). Logs the stats line
    /// before returning [`RunEnd::Exit`].
    pub fn run(&mut self, signals: &Signals) -> io::Result<RunEnd> {
        let end = self.run_loop(signals)?;
        if end == RunEnd::Exit {
            info!(
                "shutting down: {} registrations, {} relays",
                self.registry.len(),
                self.relays.len()
            );
            self.log_stats();
            gcb_ops::logging::flush();
        }
        Ok(end)
    }
}

/// A setting as the log line shows it: durations in seconds or ms, `None` as `off`.
struct Shown<'a, T>(&'a T);

impl std::fmt::Display for Shown<'_, usize> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::fmt::Display for Shown<'_, u32> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::fmt::Display for Shown<'_, Duration> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for Shown<'_, Option<Duration>> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{d:?}"),
            None => f.write_str("off"),
        }
    }
}
