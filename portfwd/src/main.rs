//! `gcb-portfwd`: command line, signals, and the event loop (see the
//! `gcb_portfwd` library docs).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use gcb_portfwd::cidr::{Cidr, PortRange};
use gcb_portfwd::core::{Core, CoreConfig};
use gcb_portfwd::kernel::NftKernel;
use gcb_portfwd::log::{self, Level};
use gcb_portfwd::server::{self, Config, Server, DEFAULT_PORT};
use gcb_proto::PoolKey;

/// DPF server (Dynamic Port Forwarding, paper section 3): a root daemon on
/// the NAT gateway. Clients in the private network (the libgcb shim) ask it
/// over UDP to forward a public port of the gateway to their socket; it
/// installs the rule in its own nftables table (`table ip gcb_portfwd`),
/// keeps a crash-safe mirror file in --state, probes each client's
/// management socket and removes the rules of dead sockets.
#[derive(Parser, Debug)]
#[command(name = "gcb-portfwd", version)]
struct Args {
    /// The gateway's public IPv4 address: forwarded ports are on it, and
    /// clients are told PUBLIC:PORT.
    #[arg(long, value_name = "IP")]
    public: Ipv4Addr,

    /// The private network served (IPv4 CIDR): requests are accepted only
    /// from it (arriving on a LAN interface: see --lan-if), and a client
    /// may only forward to its own address in it.
    #[arg(long, value_name = "CIDR")]
    private: Cidr,

    /// Public ports handed out, LO-HI inclusive. Keep them clear of
    /// services on the gateway itself (a forwarded port shadows them).
    #[arg(long, value_name = "LO-HI")]
    ports: PortRange,

    /// State directory (created if missing): the mirror file, the epoch
    /// and a lock. Keep it across restarts: mappings come back from it,
    /// re-checked against today's --private, --ports and --quota (what
    /// fails is logged and not installed; so is everything before a
    /// corrupt record).
    #[arg(long, value_name = "DIR")]
    state: PathBuf,

    /// Control address IP[:PORT] (UDP). Default: this host's first address
    /// inside --private, port 9651. Port 0 picks a free port.
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_listen)]
    listen: Option<SocketAddr>,

    /// Pool key file: every control datagram must carry an HMAC made with
    /// this key (at least 16 bytes). Required unless --insecure is given.
    #[arg(long, value_name = "FILE", env = "GCB_KEY_FILE")]
    key_file: Option<PathBuf>,

    /// Run without a pool key: control requests are then not
    /// authenticated, and are accepted from any host inside --private whose
    /// datagram arrives on a LAN interface. Only for a LAN whose hosts are
    /// all trusted. Without a key and without this flag, gcb-portfwd
    /// refuses to start.
    #[arg(long)]
    insecure: bool,

    /// A further LAN interface (repeatable). Control datagrams are accepted
    /// only when they arrive on a LAN interface: the one holding the
    /// control address (every one with an address inside --private when
    /// --listen is 0.0.0.0), loopback, and these. Datagrams arriving on
    /// any other interface (the WAN side) are dropped and counted
    /// (dropped_wrong_interface), whatever their source address says. The
    /// interface must exist at start.
    #[arg(long = "lan-if", value_name = "IFNAME")]
    lan_if: Vec<String>,

    /// Seconds between probe rounds (each client's management socket is
    /// connected to once per round; failures remove mappings, then the
    /// three representations are synchronized).
    #[arg(long, default_value_t = 10, value_name = "N")]
    probe_interval_secs: u64,

    /// Timeout of one probe connection, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    probe_timeout_ms: u64,

    /// Consecutive unanswered probe rounds (timeouts, unreachable) before
    /// a client's mappings are removed. A refused probe (no socket listens)
    /// removes them at once.
    #[arg(long, default_value_t = 3, value_name = "N")]
    probe_failures: u32,

    /// Probe connections in flight at once.
    #[arg(long, default_value_t = 256, value_name = "N")]
    probe_concurrency: usize,

    /// Mappings per client (private IP), TCP and UDP together.
    #[arg(long, default_value_t = 256, value_name = "N")]
    quota: usize,

    /// Requests per second per client (token bucket; 0: unlimited).
    /// Excess requests are answered error{busy}.
    #[arg(long, default_value_t = 50.0, value_name = "N")]
    rate: f64,

    /// Burst of requests per client above --rate.
    #[arg(long, default_value_t = 200.0, value_name = "N")]
    burst: f64,

    /// Log a stats line every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 300, value_name = "N")]
    stats_interval_secs: u64,

    /// Most verbose log level printed.
    #[arg(long, value_enum, default_value_t = Level::Info)]
    log: Level,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| format!("{s:?} is not IP or IP:PORT"))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `sa` is zero-initialised (a valid sigaction), the handler
        // only stores to an atomic (async-signal-safe), and no SA_RESTART is
        // set, so a blocked epoll_wait returns EINTR and the loop sees STOP.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("sigaction");
        }
    }
    // SAFETY: setting SIGPIPE to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(())
}

/// Errors end the process with one line (the context chain), exit status 1, and no
/// backtrace even when RUST_BACKTRACE is set: an administrator reads this, not a developer.
fn main() {
    if let Err(e) = run() {
        eprintln!("gcb-portfwd: error: {}", gcb_proto::error_line(e.as_ref()));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    log::set_level(args.log);
    if args.private.contains(args.public) {
        bail!(
            "--public {} is inside --private {}",
            args.public,
            args.private
        );
    }
    if args.quota == 0 {
        bail!("--quota must be at least 1");
    }
    if args.key_file.is_none() && !args.insecure {
        bail!(
            "no pool key: give --key-file FILE (or set GCB_KEY_FILE) with the pool's key, \
             or --insecure to accept unauthenticated requests from the LAN"
        );
    }
    for name in &args.lan_if {
        if !server::interface_exists(name) {
            bail!("--lan-if {name}: no such interface");
        }
    }
    let key = match &args.key_file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            Some(
                PoolKey::from_file_contents(&bytes)
                    .with_context(|| format!("key file {}", path.display()))?,
            )
        }
        None => None,
    };
    let listen = match args.listen {
        Some(a) => a,
        None => {
            let ip = server::local_ip_in(args.private).with_context(|| {
                format!(
                    "no address of this host is inside --private {}; give --listen",
                    args.private
                )
            })?;
            SocketAddr::new(ip.into(), DEFAULT_PORT)
        }
    };
    let mut lan_ifs = server::lan_interfaces(listen.ip(), args.private);
    for name in &args.lan_if {
        if !lan_ifs.contains(name) {
            lan_ifs.push(name.clone());
        }
    }
    if key.is_none() {
        gcb_portfwd::log!(
            Warn,
            "--insecure, no pool key: control requests are not authenticated; accepted only from {} arriving on the LAN interfaces {}",
            args.private,
            lan_ifs.join(", ")
        );
    }
    install_signal_handlers()?;
    let kernel = NftKernel::new(args.public, args.private);
    if kernel.libnft.is_none() {
        gcb_portfwd::log!(
            Info,
            "libnftables.so.1 not loadable: every nft transaction spawns nft (~2 ms)"
        );
    }
    let cfg = CoreConfig {
        public: args.public,
        private: args.private,
        ports: args.ports,
        quota: args.quota,
        rate: args.rate,
        burst: args.burst,
        probe_failures: args.probe_failures.max(1),
    };
    let (core, report) = Core::open(cfg, kernel, &args.state)
        .with_context(|| format!("starting with state directory {}", args.state.display()))?;
    gcb_portfwd::log!(
        Info,
        "epoch {}: {} mappings restored from {} ({} records, {} corrupt, {} torn bytes, {} mappings quarantined); kernel: {} installed{}",
        core.epoch(),
        core.table().len(),
        core.mirror().path().display(),
        report.replay.records,
        report.replay.bad,
        report.replay.torn_bytes,
        report.replay.quarantined.len(),
        report.kernel_added,
        if report.kernel_replaced { " (table re-created)" } else { "" }
    );
    let scfg = Config {
        listen,
        key,
        lan_ifs: lan_ifs.clone(),
        probe_interval: Duration::from_secs(args.probe_interval_secs.max(1)),
        probe_timeout: Duration::from_millis(args.probe_timeout_ms.max(1)),
        probe_concurrency: args.probe_concurrency.max(1),
        stats_interval: (args.stats_interval_secs > 0)
            .then(|| Duration::from_secs(args.stats_interval_secs)),
    };
    let mut server =
        Server::bind(scfg, core).with_context(|| format!("binding control socket udp {listen}"))?;
    eprintln!(
        "gcb-portfwd: listening on udp {} (LAN interfaces {}), public {}, ports {}, private {}",
        server.local_addr(),
        lan_ifs.join(", "),
        args.public,
        args.ports,
        args.private
    );
    server.run(&STOP)?;
    Ok(())
}
