//! Lazy, idempotent initialisation.
//!
//! Runs from our `.init_array` constructor (before the program's own constructors in the
//! usual LD_PRELOAD case) or from the first hook that needs configuration, whichever comes
//! first. It needs nothing from Rust's runtime start-up: the environment is read with
//! libc `getenv`, state is a plain atomic. A thread that finds another thread initialising
//! waits (briefly); the initialising thread itself has the re-entrancy guard set, so the
//! calls it makes (open, fcntl, pthread_atfork...) bypass the hooks.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::guard::Guard;
use crate::log::{self, Level};

const UNINIT: u8 = 0;
const RUNNING: u8 = 1;
const READY: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);

/// Configuration read from the environment.
#[derive(Debug, Default)]
pub struct Config {
    pub broker: Option<String>,
    pub dpf_server: Option<String>,
}

static CONFIG: once_cell::sync::OnceCell<Config> = once_cell::sync::OnceCell::new();

pub fn config() -> Option<&'static Config> {
    CONFIG.get()
}

/// Make sure initialisation has run (one Acquire load when it has).
#[inline(always)]
pub fn ensure() {
    if STATE.load(Ordering::Acquire) != READY {
        ensure_slow();
    }
}

#[cold]
fn ensure_slow() {
    match STATE.compare_exchange(UNINIT, RUNNING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            let g = Guard::enter(); // None if we are already inside shim logic: fine
            let r = std::panic::catch_unwind(init);
            drop(g);
            STATE.store(READY, Ordering::Release);
            if r.is_err() {
                crate::error!("initialisation panicked; continuing in pass-through mode");
            }
        }
        Err(_) => {
            if crate::guard::in_shim() {
                return; // re-entrant call from the initialising thread itself
            }
            // Another thread is initialising: it takes microseconds. Wait, but never forever
            // (e.g. a fork child of a process that forked mid-initialisation).
            for _ in 0..10_000 {
                if STATE.load(Ordering::Acquire) == READY {
                    return;
                }
                std::thread::yield_now();
            }
        }
    }
}

fn getenv(name: &CStr) -> Option<String> {
    // SAFETY: name is NUL-terminated; getenv's result is valid until the environment changes,
    // and we copy it out immediately.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null getenv result is a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    (!s.is_empty()).then_some(s)
}

fn init() {
    crate::procid::record_pid();
    let level = getenv(c"GCB_LOG").map(|v| Level::parse(&v).unwrap_or(Level::Info));
    log::set_level(level.unwrap_or(Level::Off));
    if level.is_some_and(|l| l > Level::Off) {
        if let Some(path) = getenv(c"GCB_LOG_FILE") {
            open_log_file(&path);
        }
    }
    // One line per panic, through our logger; never Rust's multi-line default on stderr.
    // (Our std is private to libgcb.so, so this does not touch a Rust host's panic hook.)
    std::panic::set_hook(Box::new(|info| {
        let loc = info.location();
        crate::error!(
            "internal panic at {}:{}: {}; falling back to the real call",
            loc.map_or("?", |l| l.file()),
            loc.map_or(0, |l| l.line()),
            info.payload()
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| info.payload().downcast_ref::<String>().map(|s| s.as_str()))
                .unwrap_or("(non-string payload)")
        );
    }));
    crate::sys::resolve_all();
    crate::fork::register();
    let cfg = Config {
        broker: getenv(c"GCB_BROKER"),
        dpf_server: getenv(c"GCB_DPF_SERVER"),
    };
    let mode = install_layers(&cfg);
    crate::debug!(
        "loaded (version {}), {} mode",
        env!("CARGO_PKG_VERSION"),
        mode
    );
    let _ = CONFIG.set(cfg);
}

/// Install the layers configured by `GCB_BROKER` and `GCB_DPF_SERVER`; on a bad setting,
/// stay pass-through for that layer and say why in one line.
fn install_layers(cfg: &Config) -> &'static str {
    if cfg.broker.is_none() && cfg.dpf_server.is_none() {
        return "pass-through";
    }
    let key = match getenv(c"GCB_KEY_FILE") {
        None => None,
        Some(path) => match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| gcb_proto::PoolKey::from_file_contents(&b).map_err(|e| e.to_string()))
        {
            Ok(k) => Some(k),
            Err(e) => {
                crate::error!("GCB_KEY_FILE {}: {}; GCB and DPF disabled", path, e);
                return "pass-through";
            }
        },
    };
    let gcb = cfg
        .broker
        .as_deref()
        .and_then(|b| install_gcb(b, key.clone()));
    let dpf = cfg.dpf_server.as_deref().and_then(|s| {
        let addr = crate::dpf::parse_server(s)
            .map_err(|e| crate::error!("GCB_DPF_SERVER: {}; DPF disabled", e))
            .ok();
        let refresh = getenv(c"GCB_DPF_REFRESH_MS")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms >= 100)
            .map_or(
                std::time::Duration::from_secs(30),
                std::time::Duration::from_millis,
            );
        addr.map(|a| crate::dpf::DpfClient::new(a, key.clone(), refresh))
    });
    // The identity model (see docs/architecture.md): on unless GCB_PUBLIC_NAMES=0.
    crate::layer::set_public_names(getenv(c"GCB_PUBLIC_NAMES").is_none_or(|v| v.trim() != "0"));
    let stack = crate::stack::Stack { gcb, dpf };
    if let Some(spec) = getenv(c"GCB_INHERIT") {
        stack.adopt(&spec);
        // Only the image it was made for adopts it; later execs get a fresh one.
        // SAFETY: the name is NUL-terminated; init runs before the program's threads.
        unsafe { libc::unsetenv(c"GCB_INHERIT".as_ptr()) };
    }
    let name = crate::layer::Layer::name(&stack);
    if name != "none" {
        crate::layer::install(Box::new(stack));
    }
    name
}

/// The GCB layer for `GCB_BROKER=IP[:PORT]`, with the registrations an exec'ing image
/// handed over.
fn install_gcb(broker: &str, key: Option<gcb_proto::PoolKey>) -> Option<crate::gcb::GcbLayer> {
    let addr = match crate::gcb::parse_broker(broker) {
        Ok(a) => a,
        Err(e) => {
            crate::error!("GCB_BROKER: {}; GCB disabled", e);
            return None;
        }
    };
    // Heartbeats keep the NAT's UDP mapping and the broker's lease alive; the default
    // is well under Linux conntrack's 30 s. GCB_HEARTBEAT_MS tunes it (e.g. for NATs
    // that forget sooner, or short leases in tests).
    let heartbeat = getenv(c"GCB_HEARTBEAT_MS")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms >= 50)
        .map_or(
            gcb_proto::rudp::HEARTBEAT_INTERVAL,
            std::time::Duration::from_millis,
        );
    // Standby relay connections (see gcb::standby) are on unless GCB_STANDBY=0: one idle
    // TCP connection to the broker per registered listener, for faster relayed connects.
    let standby = getenv(c"GCB_STANDBY").is_none_or(|v| v.trim() != "0");
    Some(crate::gcb::GcbLayer::new(addr, key, heartbeat, standby))
}

fn open_log_file(path: &str) {
    let Ok(c) = std::ffi::CString::new(path) else {
        return;
    };
    // SAFETY: c is NUL-terminated; open(2) is not interposed.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        crate::warn!("cannot open GCB_LOG_FILE {}; logging to stderr", path);
        return;
    }
    match crate::fdtable::own_fd(fd, "log file") {
        // The table keeps the ShimFd alive; fdtable tells the logger when it moves.
        Ok(sfd) => log::set_fd(sfd.fd()),
        Err(_) => crate::sys::close_raw(fd),
    }
}
