//! `GCB_CHECK=version` (`gcb-run --version`) prints the library's version and commit and
//! exits. `GCB_CHECK=1` (what `gcb-run --check` sets): instead of running the program, say on
//! stderr which settings are in effect and whether the configured daemons answer, then
//! exit 0 if every configured daemon answered and nothing was misconfigured, else 1.
//!
//! The probes speak the real control protocol with the real pool key, so an answer also
//! proves the key is accepted: the broker gets a `heartbeat` for no registrations (it
//! answers `heartbeat_ack`), portfwd a `query` for the unspecified address (it answers
//! `query_result`). Neither changes any state in the daemon.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use gcb_proto::{Body, PoolKey, Transport};

use crate::control::{Answer, Channel};

/// This library's version and the git commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GCB_GIT_COMMIT"), ")");

/// `GCB_CHECK=version`: print `libgcb VERSION` on stderr and exit 0.
pub fn version() -> ! {
    eprintln!("libgcb {VERSION}");
    // SAFETY: _exit has no preconditions; nothing of the program ran yet.
    unsafe { libc::_exit(0) }
}

/// How long a probe waits for its answer.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// One line of the report, on stderr (unconditionally: the user asked for it).
fn say(line: std::fmt::Arguments<'_>) {
    eprintln!("gcb-check: {line}");
}

/// What the check knows: the effective settings as `(key, value, where from)`, the
/// daemons, the key (Err: configured but unusable, already said) and whether some setting
/// was unusable.
pub struct Report<'a> {
    pub settings: &'a [(String, String, String)],
    pub broker: Option<&'a str>,
    pub dpf_server: Option<&'a str>,
    pub key: Result<Option<PoolKey>, ()>,
}

/// Prints the report, probes, and exits the process.
pub fn run(r: Report<'_>) -> ! {
    let mut ok = true;
    for (k, v, from) in r.settings {
        say(format_args!("{k} = {v:?} ({from})"));
    }
    let key = match r.key {
        Ok(k) => {
            if k.is_none() {
                say(format_args!(
                    "no pool key: the control plane is unauthenticated"
                ));
            }
            k
        }
        Err(()) => {
            say(format_args!("the pool key is unusable (see above)"));
            ok = false;
            None
        }
    };
    if r.broker.is_none() && r.dpf_server.is_none() {
        say(format_args!(
            "neither broker nor dpf_server is set: the shim does nothing"
        ));
        ok = false;
    }
    if let Some(b) = r.broker {
        match crate::gcb::parse_pool(b) {
            Ok(pool) => {
                for p in &pool.problems {
                    say(format_args!("broker: left out {p}"));
                    ok = false;
                }
                for addr in pool.brokers {
                    ok &= probe("broker", Ok(addr), &key, || Body::Heartbeat {
                        proxies: vec![],
                    });
                }
            }
            Err(e) => {
                say(format_args!("broker: unusable address: {e}"));
                ok = false;
            }
        }
    }
    if let Some(d) = r.dpf_server {
        ok &= probe("portfwd", crate::dpf::parse_server(d), &key, || {
            Body::Query {
                transport: Transport::Tcp,
                public: SocketAddr::from(([0, 0, 0, 0], 0)),
            }
        });
    }
    say(format_args!(
        "{}",
        if ok {
            "OK: everything configured answers"
        } else {
            "FAILED"
        }
    ));
    // SAFETY: _exit has no preconditions; nothing of the program ran yet.
    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
}

/// Sends one request to the daemon `what` at `addr`; says what happened; true if it
/// answered as expected.
fn probe(
    what: &str,
    addr: Result<SocketAddrV4, gcb_proto::addr::AddrError>,
    key: &Option<PoolKey>,
    body: impl Fn() -> Body,
) -> bool {
    let addr = match addr {
        Ok(a) => a,
        Err(e) => {
            say(format_args!("{what}: unusable address: {e}"));
            return false;
        }
    };
    let mut chan = match Channel::<()>::open(addr, key) {
        Ok((c, _)) => c,
        Err(e) => {
            say(format_args!(
                "{what} {addr}: cannot open a socket to it: {}",
                std::io::Error::from_raw_os_error(e)
            ));
            return false;
        }
    };
    let answer = chan.request(addr, body(), PROBE_DEADLINE);
    chan.close();
    match answer {
        Ok(Answer::Body(Body::HeartbeatAck { .. } | Body::QueryResult { .. })) => {
            say(format_args!(
                "{what} {addr}: answering{}",
                if key.is_some() {
                    " (pool key accepted)"
                } else {
                    " (unauthenticated)"
                }
            ));
            true
        }
        Ok(Answer::Body(Body::Error { code, reason })) => {
            say(format_args!("{what} {addr}: refused: {code:?}: {reason}"));
            false
        }
        Ok(Answer::Body(other)) => {
            say(format_args!(
                "{what} {addr}: answered with an unexpected {}",
                other.type_name()
            ));
            false
        }
        Ok(Answer::Timeout) | Err(_) => {
            say(format_args!(
                "{what} {addr}: NOT answering within {} s (not running, unreachable, or it rejects our pool key)",
                PROBE_DEADLINE.as_secs()
            ));
            false
        }
    }
}
