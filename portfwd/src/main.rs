//! `gcb-portfwd`: command line, signals, and the event loop (see the
//! `gcb_portfwd` library docs).

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gcb_ops::logging::{self, Level, Output};
use gcb_ops::{keyfile, lifecycle};
use gcb_portfwd::core::{Core, CoreConfig};
use gcb_portfwd::kernel::NftKernel;
use gcb_portfwd::policy::{self, PortRange};
use gcb_portfwd::server::{self, Config, RunEnd, Server, Signals, DEFAULT_PORT};
use gcb_proto::addr::endpoint_arg;
use gcb_proto::conf::{self, ConfError, Layered};
use ipnet::Ipv4Net;

/// DPF server (Dynamic Port Forwarding, paper section 3): a root daemon on
/// the NAT gateway. Clients in the private network (the libgcb shim) ask it
/// over UDP to forward a public port of the gateway to their socket; it
/// installs the rule in its own nftables table (`table ip gcb_portfwd`),
/// keeps a crash-safe mirror file in --state, probes each client's
/// management socket and removes the rules of dead sockets.
#[derive(Parser, Debug)]
#[command(name = "gcb-portfwd", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GCB_GIT_COMMIT"), ")"), after_help = STATUS_HELP)]
struct Args {
    /// The gateway's public IPv4 address: forwarded ports are on it (the
    /// dnat rules match packets arriving to it), and clients are told
    /// PUBLIC:PORT unless --advertise says otherwise.
    #[arg(long, value_name = "IP")]
    public: Ipv4Addr,

    /// The private network served (IPv4 CIDR): requests are accepted only
    /// from it (arriving on a LAN interface: see --lan-if), and a client
    /// may only forward to its own address in it.
    #[arg(long, value_name = "CIDR", value_parser = policy::parse_net)]
    private: Ipv4Net,

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
    #[arg(long, value_name = "IP[:PORT]", value_parser = endpoint_arg::<DEFAULT_PORT>)]
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

    /// The IPv4 address clients are told their forwarded ports are on, when
    /// it is not --public: a gateway on a cloud whose public IP is 1:1-NATed
    /// to its WAN interface's address (no interface holds the public IP).
    /// Then --public is that WAN address (packets arrive to it, the rules
    /// match it) and --advertise the public IP. Hosts of --private reach
    /// ADVERTISE:PORT only if the cloud's NAT hairpins.
    #[arg(long, value_name = "IP")]
    advertise: Option<Ipv4Addr>,

    /// Admin unix socket, answered by `gcb-portfwd status` (mode 0600: root and this
    /// user only). Default: /run/gcb/portfwd.sock as root, else
    /// $XDG_RUNTIME_DIR/gcb/portfwd.sock (or /tmp/gcb-UID/portfwd.sock). `none`: no socket.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,

    /// Serve Prometheus metrics (`GET /metrics`, HTTP) on this IP:PORT, e.g.
    /// 127.0.0.1:9661. Default: off. Anyone who reaches it reads the counters: keep it
    /// on loopback or a management network.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<SocketAddr>,
}

const STATUS_HELP: &str =
    "Status of the running daemon: gcb-portfwd status [--json] [--admin-socket PATH]";

/// `gcb-portfwd status`: prints what the running daemon serves, from its admin socket
/// (the path from `--admin-socket`, else the configuration, else the default).
fn status_command() -> Result<()> {
    let config = std::path::Path::new(DEFAULT_CONFIG);
    let render = gcb_portfwd::status::render;
    gcb_ops::status_client::run::<Args, _>("portfwd", "GCB_PORTFWD", config, render)?;
    Ok(())
}

/// The address clients are told (--advertise, else --public); refused inside --private.
fn advertised(args: &Args) -> Result<Ipv4Addr> {
    let Some(ip) = args.advertise else {
        return Ok(args.public);
    };
    if args.private.contains(&ip) || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        bail!(
            "--advertise {ip}: must be a unicast address outside --private {}",
            args.private
        );
    }
    Ok(ip)
}

/// Errors end the process with one line (the context chain), exit status 1, and no
/// backtrace even when RUST_BACKTRACE is set: an administrator reads this, not a developer.
fn main() {
    if let Err(e) = run() {
        eprintln!("gcb-portfwd: error: {}", gcb_proto::error_line(e.as_ref()));
        std::process::exit(1);
    }
}

/// The configuration file read when `--config` is not given (if it exists).
const DEFAULT_CONFIG: &str = "/etc/gcb/portfwd.toml";

/// The arguments from `argv`: this file's flags, each also a key of the config file and
/// an environment variable `GCB_PORTFWD_FLAG` (see `gcb_proto::conf`). The one place
/// arguments are read, at start and on every SIGHUP (which so re-reads the file).
fn load_args(argv: &[OsString]) -> Result<Layered<Args>, ConfError> {
    conf::parse_process::<Args>(argv, "GCB_PORTFWD", std::path::Path::new(DEFAULT_CONFIG))
}

/// The effective configuration from `argv` (see [`load_args`]): the server's, the
/// core's, the log level and the state directory. The key file is read here, so a
/// reload re-reads it.
fn load_settings(argv: &[OsString]) -> Result<Settings> {
    settings(&load_args(argv)?.args)
}

/// What [`settings`] resolves.
struct Settings {
    /// The server's configuration.
    server: Config,
    /// The core's (its `public` is the advertised address).
    core: CoreConfig,
    /// The log level.
    level: Level,
    /// The state directory.
    state: PathBuf,
    /// `--public`: the WAN address the rules match (the kernel's, fixed at start).
    wan: Ipv4Addr,
}

/// [`load_settings`] from parsed arguments.
fn settings(args: &Args) -> Result<Settings> {
    if args.private.contains(&args.public) {
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
    let key = args.key_file.as_deref().map(keyfile::load).transpose()?;
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
        tracing::warn!(
            "--insecure, no pool key: control requests are not authenticated; accepted only from {} arriving on the LAN interfaces {}",
            args.private,
            lan_ifs.join(", ")
        );
    }
    let core = CoreConfig {
        public: advertised(args)?,
        private: args.private,
        ports: args.ports,
        quota: args.quota,
        rate: args.rate,
        burst: args.burst,
        probe_failures: args.probe_failures.max(1),
    };
    let cfg = Config {
        listen,
        key,
        lan_ifs,
        probe_interval: Duration::from_secs(args.probe_interval_secs.max(1)),
        probe_timeout: Duration::from_millis(args.probe_timeout_ms.max(1)),
        probe_concurrency: args.probe_concurrency.max(1),
        stats_interval: (args.stats_interval_secs > 0)
            .then(|| Duration::from_secs(args.stats_interval_secs)),
    };
    Ok(Settings {
        server: cfg,
        core,
        level: args.log,
        state: args.state.clone(),
        wan: args.public,
    })
}

/// SIGHUP: resolves the configuration again and applies it, logging one line: what
/// changed, or the error that kept the running configuration.
fn reload<K: gcb_portfwd::kernel::KernelBackend>(
    server: &mut Server<K>,
    argv: &[OsString],
    running_wan: Ipv4Addr,
) {
    let Settings {
        server: cfg,
        core,
        level,
        state,
        wan,
    } = match load_settings(argv) {
        Ok(x) => x,
        Err(e) => {
            let why = gcb_proto::error_line(e.as_ref());
            tracing::error!("{}", lifecycle::refused_line(&why));
            return;
        }
    };
    let level_change = logging::change_level(level);
    let mut changes = server.reconfigure(cfg, &core);
    // The rules match --public; with --advertise the core only knows the advertised one.
    if wan != running_wan && core.public != wan {
        changes
            .need_restart
            .push(format!("public (rules) {running_wan}->{wan}"));
    }
    if server.core().mirror().path() != state.join(gcb_portfwd::mirror::MIRROR_FILE) {
        changes
            .need_restart
            .push(format!("state {}", state.display()));
    }
    tracing::info!("{}", changes.line(level_change));
}

fn run() -> Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "status") {
        return status_command();
    }
    let argv: Vec<OsString> = std::env::args_os().collect();
    let layered = match load_args(&argv) {
        Err(ConfError::Cli(e)) => e.exit(),
        r => r?,
    };
    let args = &layered.args;
    logging::init("gcb-portfwd", args.log, Output::Immediate);
    let Settings {
        server: scfg,
        core: cfg,
        state,
        wan,
        ..
    } = settings(args)?;
    if layered.check_config {
        print!("{}", layered.check_report("gcb-portfwd"));
        return Ok(());
    }
    let signals = Signals::install()?;
    // The rules match --public, the address packets arrive on (clients are told
    // cfg.public, which --advertise may make another).
    let kernel = NftKernel::new(args.public, cfg.private);
    if kernel.libnft.is_none() {
        tracing::info!("libnftables.so.1 not loadable: every nft transaction spawns nft (~2 ms)");
    }
    let (public, private, ports) = (cfg.public, cfg.private, cfg.ports);
    let (core, report) = Core::open(cfg, kernel, &state, Instant::now())
        .with_context(|| format!("starting with state directory {}", state.display()))?;
    tracing::info!(
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
    let listen = scfg.listen;
    let lan_ifs = scfg.lan_ifs.join(", ");
    let mut server =
        Server::bind(scfg, core).with_context(|| format!("binding control socket udp {listen}"))?;
    let admin = gcb_ops::admin_socket_arg(args.admin_socket.as_deref(), "portfwd");
    server.open_ops(admin.as_deref(), args.metrics)?;
    if let Some(ops) = server.ops() {
        if let Some(p) = ops.admin_path() {
            logging::always(&format!("admin socket {}", p.display()));
        }
        if let Some(m) = ops.metrics_addr() {
            logging::always(&format!("metrics on http://{m}/metrics"));
        }
    }
    logging::always(&format!(
        "listening on udp {} (LAN interfaces {lan_ifs}), public {public}, ports {ports}, private {private}",
        server.local_addr(),
    ));
    loop {
        match server.run(&signals)? {
            RunEnd::Exit => return Ok(()),
            RunEnd::Reload => reload(&mut server, &argv, wan),
        }
    }
}
