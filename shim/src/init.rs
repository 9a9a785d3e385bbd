//! Lazy, idempotent initialisation.
//!
//! Runs from our `.init_array` constructor (before the program's own constructors in the
//! usual LD_PRELOAD case) or from the first hook that needs configuration, whichever comes
//! first. It needs nothing from Rust's runtime start-up: the environment is read with
//! libc `getenv`, state is a plain atomic. A thread that finds another thread initialising
//! waits (briefly); the initialising thread itself has the re-entrancy guard set, so the
//! calls it makes (open, fcntl, pthread_atfork...) bypass the hooks.
//!
//! Settings come from the environment (`GCB_BROKER`...) over the config file
//! (`/etc/gcb/gcb.conf` or `GCB_CONF`, see [`crate::conf`]); each unusable one is said
//! once on stderr (see [`crate::log`]) and the shim carries on without it. `GCB_CHECK=1`
//! (set by `gcb-run --check`) makes initialisation probe the configured daemons and exit
//! (see [`crate::check`]).

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

/// The config file every process reads (`GCB_CONF` overrides it; see [`crate::conf`]).
pub const DEFAULT_CONF: &str = "/etc/gcb/gcb.conf";

/// The settings: the environment over the config file.
pub struct Settings {
    /// The config file's path and contents, if one was read.
    conf: Option<(String, crate::conf::Conf)>,
}

impl Settings {
    /// Reads the config file; what it cannot use is returned as lines to say later (the
    /// log level may come from the file).
    fn load() -> (Settings, Vec<(Level, log::Notice, String)>) {
        let mut said = Vec::new();
        let (path, explicit) = match getenv(c"GCB_CONF") {
            Some(p) => (p, true),
            None => (DEFAULT_CONF.to_owned(), false),
        };
        let conf = match std::fs::read(&path) {
            Ok(bytes) => {
                let c = crate::conf::parse(&String::from_utf8_lossy(&bytes));
                for p in &c.problems {
                    said.push((
                        Level::Warn,
                        log::Notice::ConfLine,
                        format!(
                            "{}:{}:{} {}; line ignored",
                            path,
                            p.line,
                            p.key.as_deref().map_or(String::new(), |k| format!(" {k}:")),
                            p.what
                        ),
                    ));
                }
                Some((path, c))
            }
            Err(e) if explicit || e.kind() != std::io::ErrorKind::NotFound => {
                said.push((
                    Level::Error,
                    log::Notice::ConfFile,
                    format!("config file {path}: {e}; using the environment only"),
                ));
                None
            }
            Err(_) => None,
        };
        (Settings { conf }, said)
    }

    /// `key` (a [`crate::conf::KEYS`] name): `GCB_<KEY>` from the environment, else the
    /// config file's; with where it came from, for messages.
    pub fn get(&self, key: &str) -> Option<(String, String)> {
        let var = format!("GCB_{}", key.to_ascii_uppercase());
        if let Some(v) = std::ffi::CString::new(var.as_str())
            .ok()
            .and_then(|c| getenv(&c))
        {
            return Some((v, var));
        }
        let (path, conf) = self.conf.as_ref()?;
        let v = conf.get(key)?.as_setting();
        (!v.is_empty()).then(|| (v, format!("{key} in {path}")))
    }

    fn value(&self, key: &str) -> Option<String> {
        self.get(key).map(|(v, _)| v)
    }

    /// A number of milliseconds of at least `min`, or `default` (and one warning if set
    /// but unusable).
    fn millis(&self, key: &str, min: u64, default: std::time::Duration) -> std::time::Duration {
        let Some((v, from)) = self.get(key) else {
            return default;
        };
        match v.trim().parse::<u64>() {
            Ok(ms) if ms >= min => std::time::Duration::from_millis(ms),
            _ => {
                crate::notice!(
                    Warn,
                    BadSetting,
                    "{from}={v:?} is not a number of milliseconds >= {min}; using {}",
                    default.as_millis()
                );
                default
            }
        }
    }

    /// A switch that is on unless set to 0.
    fn on_unless_zero(&self, key: &str) -> bool {
        self.value(key).is_none_or(|v| v.trim() != "0")
    }
}

fn init() {
    crate::procid::record_pid();
    // First: the notices below write through the resolved write(2).
    crate::sys::resolve_all();
    // What an exec'ing parent already said (see log's module docs).
    if let Some(bits) = getenv(c"GCB_SAID").and_then(|v| v.parse::<u32>().ok()) {
        log::mark_said(bits);
    }
    log::share_said();
    let (settings, conf_lines) = Settings::load();
    let (level, bad_level) = match settings.get("log") {
        None => (None, None),
        Some((v, from)) => match Level::parse(&v) {
            Some(l) => (Some(l), None),
            // A typo: the user wants to hear something, but not every event.
            None => (Some(Level::Warn), Some((v, from))),
        },
    };
    log::set_level(level.unwrap_or(Level::Off));
    log::set_notice_level(level.unwrap_or(Level::Warn));
    if level.is_some_and(|l| l > Level::Off) {
        if let Some(path) = settings.value("log_file") {
            open_log_file(&path);
        }
    }
    if let Some((v, from)) = bad_level {
        crate::notice!(
            Warn,
            LogLevel,
            "{from}={v:?} is not a log level ({}); using warn",
            log::LEVEL_NAMES
        );
    }
    // The config file's lines once per process tree and exec chain, like every notice
    // (each bad line has its own line, so ConfLine itself is not deduplicated).
    if !log::said_before(log::Notice::ConfLine) {
        for (l, what, line) in conf_lines {
            log::notice(l, what, format_args!("{line}"));
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
    crate::fork::register();
    let cfg = Config {
        broker: settings.value("broker"),
        dpf_server: settings.value("dpf_server"),
    };
    let mode = install_layers(&cfg, &settings);
    crate::debug!("loaded (version {}), {} mode", crate::check::VERSION, mode);
    match getenv(c"GCB_CHECK").as_deref() {
        // `gcb-run --version`: which library this is.
        Some("version") => crate::check::version(),
        Some(_) => run_check(&settings, &cfg), // exits the process
        None => {}
    }
    export_said();
    let _ = CONFIG.set(cfg);
}

/// `GCB_CHECK`: report the effective settings and probe the daemons (see [`crate::check`]).
fn run_check(settings: &Settings, cfg: &Config) -> ! {
    let mut list: Vec<(String, String, String)> = vec![match &settings.conf {
        Some((path, _)) => ("config file".into(), path.clone(), "read".into()),
        None => (
            "config file".into(),
            getenv(c"GCB_CONF").unwrap_or_else(|| DEFAULT_CONF.into()),
            "absent or unreadable: not used".into(),
        ),
    }];
    for k in crate::conf::KEYS {
        if let Some((v, from)) = settings.get(k) {
            list.push(((*k).to_owned(), v, from));
        }
    }
    // The key again, quietly: install_layers already said what is wrong with it.
    let key = load_key(settings);
    crate::check::run(crate::check::Report {
        settings: &list,
        broker: cfg.broker.as_deref(),
        dpf_server: cfg.dpf_server.as_deref(),
        key,
    })
}

/// Hands what this image said to the images it execs (`GCB_SAID`), so a wrapper shell
/// and its program do not both say it. Runs in the constructor, before the program's
/// threads exist (setenv is not thread-safe).
fn export_said() {
    let bits = log::export_said();
    if bits == 0 {
        return;
    }
    if let Ok(v) = std::ffi::CString::new(bits.to_string()) {
        // SAFETY: both strings are NUL-terminated; see above for thread safety.
        unsafe { libc::setenv(c"GCB_SAID".as_ptr(), v.as_ptr(), 1) };
    }
}

/// What a plain-sockets fallback means, for the lines that say one.
const PLAIN: &str = "the program runs with plain sockets";

/// The pool key from `key_file`: Err(()) when one is configured but unusable (said once).
fn load_key(settings: &Settings) -> Result<Option<gcb_proto::PoolKey>, ()> {
    let Some((path, from)) = settings.get("key_file") else {
        return Ok(None);
    };
    let read = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| gcb_proto::PoolKey::from_file_contents(&b).map_err(|e| e.to_string()));
    match read {
        Ok(k) => {
            use std::os::unix::fs::PermissionsExt;
            if let Some(why) = std::fs::metadata(&path)
                .ok()
                .and_then(|m| gcb_proto::auth::loose_key_mode(m.permissions().mode()))
            {
                crate::notice!(Warn, KeyMode, "key file {path} ({from}) {why}");
            }
            Ok(Some(k))
        }
        Err(e) => {
            crate::notice!(
                Error,
                KeyFile,
                "key file {path} ({from}): {e}; GCB and DPF disabled, {PLAIN}"
            );
            Err(())
        }
    }
}

/// Install the layers configured by `broker` and `dpf_server`; on a bad setting,
/// stay pass-through for that layer and say why in one line.
fn install_layers(cfg: &Config, settings: &Settings) -> &'static str {
    if cfg.broker.is_none() && cfg.dpf_server.is_none() {
        return "pass-through";
    }
    let Ok(key) = load_key(settings) else {
        return "pass-through";
    };
    let gcb = cfg
        .broker
        .as_deref()
        .and_then(|b| install_gcb(b, key.clone(), settings));
    let dpf = cfg.dpf_server.as_deref().and_then(|s| {
        let addr = crate::dpf::parse_server(s)
            .map_err(|e| {
                crate::notice!(
                    Error,
                    DpfAddr,
                    "{}: {}; DPF disabled",
                    source_of(settings, "dpf_server"),
                    e
                )
            })
            .ok();
        let refresh = settings.millis("dpf_refresh_ms", 100, std::time::Duration::from_secs(30));
        addr.map(|a| crate::dpf::DpfClient::new(a, key.clone(), refresh))
    });
    // The identity model (see docs/architecture.md): on unless GCB_PUBLIC_NAMES=0.
    crate::layer::set_public_names(settings.on_unless_zero("public_names"));
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

/// Where `key`'s value came from, for messages.
fn source_of(settings: &Settings, key: &str) -> String {
    settings
        .get(key)
        .map_or_else(|| key.to_owned(), |(_, from)| from)
}

/// The GCB layer for `broker` = `IP[:PORT]`, a list of them or a DNS name (a pool), with the registrations an exec'ing image
/// handed over.
fn install_gcb(
    broker: &str,
    key: Option<gcb_proto::PoolKey>,
    settings: &Settings,
) -> Option<crate::gcb::GcbLayer> {
    let pool = match crate::gcb::parse_pool(broker) {
        Ok(p) => p,
        Err(e) => {
            let ipv6 = e.contains("IPv6");
            crate::notice!(
                Error,
                BrokerAddr,
                "{}: {}{}; GCB disabled, {PLAIN}",
                source_of(settings, "broker"),
                e,
                if ipv6 {
                    " (IPv6 brokers are not supported: give the broker's IPv4 address)"
                } else {
                    ""
                }
            );
            return None;
        }
    };
    if !pool.problems.is_empty() {
        crate::notice!(
            Error,
            BrokerAddr,
            "{}: left out {}; using the brokers {}",
            source_of(settings, "broker"),
            pool.problems.join("; "),
            pool.brokers
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    // Heartbeats keep the NAT's UDP mapping and the broker's lease alive; the default
    // is well under Linux conntrack's 30 s. GCB_HEARTBEAT_MS tunes it (e.g. for NATs
    // that forget sooner, or short leases in tests).
    let heartbeat = settings.millis("heartbeat_ms", 50, gcb_proto::rudp::HEARTBEAT_INTERVAL);
    // Standby relay connections (see gcb::standby) are on unless GCB_STANDBY=0: one idle
    // TCP connection to the broker per registered listener, for faster relayed connects.
    let standby = settings.on_unless_zero("standby");
    // TCP hole punching (see gcb::tcp_punch) is on unless GCB_PUNCH_TCP=0; a punch that has
    // not connected after GCB_PUNCH_MS gives way to the relay.
    let punch = settings
        .on_unless_zero("punch_tcp")
        .then(|| settings.millis("punch_ms", 10, crate::gcb::tcp_punch::DEFAULT_PUNCH_WAIT));
    let layer = crate::gcb::GcbLayer::new(pool.brokers, key, heartbeat, standby);
    layer.client().lock().set_punch(punch);
    Some(layer)
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
        crate::notice!(
            Warn,
            LogFile,
            "cannot open log file {}: {}; logging to stderr",
            path,
            std::io::Error::last_os_error()
        );
        return;
    }
    match crate::fdtable::own_fd(fd, "log file") {
        // The table keeps the ShimFd alive; fdtable tells the logger when it moves.
        Ok(sfd) => log::set_fd(sfd.fd()),
        Err(_) => crate::sys::close_raw(fd),
    }
}
