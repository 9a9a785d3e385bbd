//! `gcb-brokerd`: command line, signals, and the event loop (see the
//! `gcb_brokerd` library docs for the architecture).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use gcb_brokerd::allow::{AllowList, Cidr};
use gcb_brokerd::server::{Config, PortRange, RunEnd, Server, Signals, DEFAULT_PORT};
use gcb_ops::logging::{self, Level, Output};
use gcb_ops::{keyfile, lifecycle};
use gcb_proto::addr::endpoint_arg;
use gcb_proto::conf::{self, ConfError, Layered};

/// GCB broker daemon: registers listening sockets of GCB clients, opens a
/// proxy socket for each, brokers connections to them (direct, reverse or
/// relayed) and relays TCP and UDP (paper 4.2.2) between clients that
/// cannot reach each other.
#[derive(Parser, Debug)]
#[command(name = "gcb-brokerd", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GCB_GIT_COMMIT"), ")"), after_help = STATUS_HELP)]
struct Args {
    /// Address to serve on: IP[:PORT] (default port 9650). The control
    /// protocol uses UDP on it and the relay TCP on the same IP:PORT; proxy
    /// sockets are bound on the same IP. Must be a specific IP (it is also
    /// the advertised one). Port 0 picks a free port. Same as --bind IP[:PORT]
    /// --advertise IP.
    #[arg(long, value_parser = endpoint_arg::<DEFAULT_PORT>, conflicts_with = "bind")]
    listen: Option<SocketAddr>,

    /// Pool key file: every control datagram must carry an HMAC made with
    /// this key (at least 16 bytes; surrounding whitespace is ignored), and
    /// tokens on the relay port and the UDP proxies are derived with it.
    /// Required unless --insecure. Make one with --generate-key.
    #[arg(long, value_name = "FILE", env = "GCB_KEY_FILE")]
    key_file: Option<PathBuf>,

    /// Run without a pool key: control requests are then not authenticated, so
    /// they are accepted only from loopback and the --allow networks, the
    /// listener is never asked to dial out for a request before its connector
    /// has connected to the relay port, and proxy addresses do not survive a
    /// broker restart. For a closed test network; say it explicitly.
    #[arg(long)]
    insecure: bool,

    /// Accept control datagrams only from these networks (CIDR or bare IP;
    /// repeatable). With a key, default: from everywhere (the key
    /// authenticates). With --insecure: loopback plus these.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<Cidr>,

    /// Write a new random pool key (256 bits, hex) to FILE (mode 0600; an
    /// existing file is never overwritten) and exit. Copy it to every host of
    /// the pool and give it to the daemons (--key-file) and to gcb-run
    /// (--key-file or GCB_KEY_FILE).
    #[arg(long, value_name = "FILE")]
    generate_key: Option<PathBuf>,

    /// Seconds a freed proxy address (unregistered, lease expired) stays
    /// reserved for its owner: only a re-registration that proves it owned the
    /// address gets it back meanwhile. At least two heartbeat intervals.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    proxy_reserve_secs: u64,

    /// Maximum registrations (proxy sockets, one fd each), broker-wide.
    #[arg(long, default_value_t = 16_384)]
    max_registrations: usize,

    /// Maximum registrations per client IP (all its source ports together:
    /// a host gets new ports for free). A whole pool behind one NAT shares
    /// its public IP: 2048 covers hundreds of workers with a few listeners
    /// each (500 x 4), while one host takes at most an eighth of the
    /// broker-wide cap. Refused with error{quota}.
    #[arg(long, default_value_t = 2048)]
    max_registrations_per_ip: usize,

    /// Maximum concurrent relayed connections (including pairings still
    /// waiting for their second side). Connections beyond it are reset and
    /// relay decisions answered error{busy}.
    #[arg(long, default_value_t = 1024)]
    max_relays: usize,

    /// Maximum relays (running plus waiting) per connector IP: the IP of a
    /// client connecting to a proxy, or of the GCB client that asked
    /// (connect_request). The listener's side does not count, so a busy pool
    /// behind one NAT serving many clients is not capped. 256 is many
    /// concurrent relayed connections for one host or NAT, and a quarter of
    /// --max-relays: one host cannot take all relays (e.g. by opening idle
    /// connections to a proxy).
    #[arg(long, default_value_t = 256)]
    max_relays_per_ip: usize,

    /// Maximum connections per proxy waiting for their listener (accepted or
    /// brokered, not yet paired with the listener's standby or dial-back).
    /// A pairing normally waits one round trip; 64 absorbs a burst of
    /// connections to one listener, yet a flood cannot queue more phantom
    /// connections at a listener than that.
    #[arg(long, default_value_t = 64)]
    max_pending_per_proxy: usize,

    /// Maximum connections per connector IP waiting for their listener (any
    /// proxy). Half of --max-pending-per-proxy, so one host cannot fill a
    /// proxy's waiting slots by itself.
    #[arg(long, default_value_t = 32)]
    max_pending_per_ip: usize,

    /// Maximum relay-port connections still sending their preamble.
    #[arg(long, default_value_t = 1024)]
    max_preambles: usize,

    /// Maximum relay-port connections still sending their preamble, per
    /// source IP. An honest preamble arrives with the connection (microseconds
    /// to one round trip), so even a pool restarting behind one NAT rarely
    /// has more than a few in flight; a refused dial is retried by the shim.
    /// 128 is an eighth of --max-preambles: slow preambles from one host
    /// cannot block the relay port.
    #[arg(long, default_value_t = 128)]
    max_preambles_per_ip: usize,

    /// Control datagrams per second per source IP (token bucket; excess is
    /// dropped and counted; 0: no limit). A pool of 1,000 shim processes
    /// behind one NAT heartbeats at ~100/s (one per client per 10 s) plus
    /// its connection requests; 200/s leaves room, and one host gets a small
    /// share of what the broker serves (~10,000 requests/s).
    #[arg(long, default_value_t = 200)]
    control_rate_per_ip: u32,

    /// Token bucket size of --control-rate-per-ip: a whole pool restarting
    /// behind one NAT (2,000 registrations at once) passes without loss.
    #[arg(long, default_value_t = 2000)]
    control_burst_per_ip: u32,

    /// A relay that moved no byte either way for this many seconds is reset
    /// (both ends), freeing its slot (0: never). One hour: longer than any
    /// pause of a working transfer or an interactive session's coffee break,
    /// short enough that idle connections opened to exhaust the relays do
    /// not hold them for good. TCP keepalive probes carry no bytes: programs
    /// that stay silent longer should send application keepalives.
    #[arg(long, default_value_t = 3600)]
    relay_idle_secs: u64,

    /// Registration lease in milliseconds: a registration not renewed by a
    /// heartbeat within this loses its proxy socket.
    #[arg(long, default_value_t = 35_000)]
    lease_ms: u64,

    /// How long (ms) a connect id waits for its partner connection before
    /// the waiting side is closed. Generous: on a lossy path TCP's own backoff
    /// can delay a dial-back by seconds.
    #[arg(long, default_value_t = 20_000)]
    connect_timeout_ms: u64,

    /// How long (ms) a relay-port connection may take to send its preamble
    /// (a 45-byte segment that TCP may have to retransmit several times on a
    /// lossy path).
    #[arg(long, default_value_t = 15_000)]
    preamble_timeout_ms: u64,

    /// UDP relay rule idle time (ms): a rule (proxy, sender address) that
    /// relayed no datagram in either direction for this long expires; the
    /// listener can no longer send to that sender until it sends again,
    /// which creates a new rule (paper 4.2.2).
    #[arg(long, default_value_t = 60_000)]
    udp_rule_idle_ms: u64,

    /// Maximum UDP relay rules, broker-wide. When full, datagrams from new
    /// senders are dropped (counted, rate-limited log line); live rules are
    /// never evicted.
    #[arg(long, default_value_t = 65_536)]
    max_udp_rules: usize,

    /// Maximum UDP relay rules per UDP proxy (same refusal as
    /// --max-udp-rules).
    #[arg(long, default_value_t = 4096)]
    max_udp_rules_per_proxy: usize,

    /// Maximum UDP relay rules per UDP proxy from one sender IP (all its
    /// source ports). A quarter of --max-udp-rules-per-proxy: one host
    /// spraying datagrams from thousands of ports cannot fill a proxy's table,
    /// while 1,024 senders behind one NAT (a pool sending to one collector)
    /// still fit.
    #[arg(long, default_value_t = 1024)]
    max_udp_rules_per_sender_ip: usize,

    /// Log a stats line every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 300)]
    stats_interval_secs: u64,

    /// Most verbose log level printed.
    #[arg(long, value_enum, default_value_t = Level::Info)]
    log: Level,

    /// Address to bind: IP[:PORT] (default port 9650) for the control UDP socket and
    /// the relay TCP listener; proxy sockets bind the same IP. May be 0.0.0.0 (every
    /// local address), then --advertise is required. Instead of --listen.
    #[arg(long, value_parser = endpoint_arg::<DEFAULT_PORT>, value_name = "IP[:PORT]")]
    bind: Option<SocketAddr>,

    /// The IP clients reach this broker at, told to them as the IP of every proxy
    /// address and of the relay port (default: the --listen / --bind IP). For a host
    /// whose public IP no interface holds (a cloud VM behind 1:1 NAT): --bind 0.0.0.0
    /// --advertise PUBLIC_IP. Clients use PUBLIC_IP:PORT as their broker address.
    #[arg(long, value_name = "IP")]
    advertise: Option<std::net::IpAddr>,

    /// Ports for proxy sockets (TCP and UDP), LO-HI inclusive, e.g. for a firewall or
    /// security group (default: ephemeral ports). One port serves one registered
    /// listener (a TCP and a UDP registration of one program may share a number).
    /// When every port is taken, registrations are refused with error{port_range}
    /// (the program then serves on its local address only) and a warning names the
    /// range.
    #[arg(long, value_name = "LO-HI")]
    proxy_ports: Option<PortRange>,

    /// One more IP of this host for TCP proxy sockets (repeatable), with its own port
    /// space (--proxy-ports, else the ephemeral range): used once every port of the IPs
    /// before it is taken. One IP has at most 64,511 proxy ports, so a broker for more
    /// TCP listeners than that needs more IPs. Bound and advertised as given; needs a
    /// specific --bind/--listen IP. UDP proxies stay on the advertised IP. GCB clients
    /// ask the broker only for proxies on its own address: connections to a proxy on
    /// another IP are brokered as for any non-GCB client (standby or dial-back, relayed).
    #[arg(long = "proxy-ip", value_name = "IP")]
    proxy_ip: Vec<std::net::IpAddr>,

    /// Admin unix socket, answered by `gcb-brokerd status` (mode 0600: root and this
    /// user only). Default: /run/gcb/brokerd.sock as root, else
    /// $XDG_RUNTIME_DIR/gcb/brokerd.sock (or /tmp/gcb-UID/brokerd.sock). `none`: no socket.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,

    /// Serve Prometheus metrics (`GET /metrics`, HTTP) on this IP:PORT, e.g.
    /// 127.0.0.1:9660. Default: off. Anyone who reaches it reads the counters: keep it
    /// on loopback or a management network.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<SocketAddr>,

    /// Seconds relays may run on after SIGTERM (the broker already refuses new
    /// registrations and connections) before they are reset and the broker exits; it
    /// exits as soon as none is left. 0: exit at once. A second SIGTERM exits at once.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    drain_grace_secs: u64,
}

const STATUS_HELP: &str =
    "Status of the running daemon: gcb-brokerd status [--json] [--admin-socket PATH]";

/// `gcb-brokerd status`: prints what the running daemon serves, from its admin socket
/// (the path from `--admin-socket`, else the configuration, else the default).
fn status_command() -> Result<()> {
    let config = std::path::Path::new(DEFAULT_CONFIG);
    let render = gcb_brokerd::status::render;
    gcb_ops::status_client::run::<Args, _>("brokerd", "GCB_BROKERD", config, render)?;
    Ok(())
}

/// The bind address: --listen or --bind, one of which is required (unless --generate-key).
fn bind_address(args: &Args) -> Result<SocketAddr> {
    args.listen.or(args.bind).context(
        "give --bind IP[:PORT] (with --advertise IP when IP is 0.0.0.0) or --listen IP[:PORT]",
    )
}

/// Each relay needs 6 fds (2 sockets, 2 pipes): raise the soft fd limit
/// to the hard limit.
fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid rlimit to fill in / read from.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Errors end the process with one line (the context chain), exit status 1, and no
/// backtrace even when RUST_BACKTRACE is set: an administrator reads this, not a developer.
fn main() {
    if let Err(e) = run() {
        eprintln!("gcb-brokerd: error: {}", gcb_proto::error_line(e.as_ref()));
        std::process::exit(1);
    }
}

/// The configuration file read when `--config` is not given (if it exists).
const DEFAULT_CONFIG: &str = "/etc/gcb/brokerd.toml";

/// The arguments from `argv`: this file's flags, each also a key of the config file and
/// an environment variable `GCB_BROKERD_FLAG` (see `gcb_proto::conf`). The one place
/// arguments are read, at start and on every SIGHUP (which so re-reads the file).
fn load_args(argv: &[OsString]) -> Result<Layered<Args>, ConfError> {
    conf::parse_process::<Args>(argv, "GCB_BROKERD", std::path::Path::new(DEFAULT_CONFIG))
}

/// The effective configuration and log level from `argv` (see [`load_args`]); the key
/// file is read here, so a reload re-reads it.
fn load_settings(argv: &[OsString]) -> Result<(Config, Level)> {
    settings(&load_args(argv)?.args)
}

/// [`load_settings`] from parsed arguments.
fn settings(args: &Args) -> Result<(Config, Level)> {
    let listen = bind_address(args)?;
    let key = args.key_file.as_deref().map(keyfile::load).transpose()?;
    let mut allow = args.allow.clone();
    match (&key, args.insecure) {
        (None, false) => anyhow::bail!(
            "no pool key: give --key-file FILE (or GCB_KEY_FILE; make one with \
             `gcb-brokerd --generate-key FILE`), or --insecure to accept unauthenticated \
             control requests from loopback and the --allow networks only"
        ),
        (None, true) => {
            allow.push("127.0.0.0/8".parse().expect("valid CIDR"));
            allow.push("::1".parse().expect("valid CIDR"));
            tracing::warn!("--insecure: no pool key; control requests are not authenticated and are accepted only from {}",
                allow
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        (Some(_), true) => {
            tracing::warn!("--insecure ignored: a pool key is configured");
        }
        (Some(_), false) => {}
    }
    let cfg = Config {
        listen,
        key,
        allow: AllowList(allow),
        max_registrations: args.max_registrations,
        max_registrations_per_ip: args.max_registrations_per_ip,
        max_relays: args.max_relays,
        max_relays_per_ip: args.max_relays_per_ip,
        max_pending_per_proxy: args.max_pending_per_proxy,
        max_pending_per_ip: args.max_pending_per_ip,
        max_preambles: args.max_preambles,
        max_preambles_per_ip: args.max_preambles_per_ip,
        control_rate_per_ip: args.control_rate_per_ip,
        control_burst_per_ip: args.control_burst_per_ip,
        relay_idle: (args.relay_idle_secs > 0).then(|| Duration::from_secs(args.relay_idle_secs)),
        lease: Duration::from_millis(args.lease_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        preamble_timeout: Duration::from_millis(args.preamble_timeout_ms),
        stats_interval: (args.stats_interval_secs > 0)
            .then(|| Duration::from_secs(args.stats_interval_secs)),
        udp_rule_idle: Duration::from_millis(args.udp_rule_idle_ms.max(1)),
        max_udp_rules: args.max_udp_rules,
        max_udp_rules_per_proxy: args.max_udp_rules_per_proxy,
        proxy_reserve: Duration::from_secs(args.proxy_reserve_secs),
        max_udp_rules_per_sender_ip: args.max_udp_rules_per_sender_ip,
        advertise: args.advertise,
        proxy_ports: args.proxy_ports,
        proxy_ips: args.proxy_ip.clone(),
        drain_grace: Duration::from_secs(args.drain_grace_secs),
    };
    Ok((cfg, args.log))
}

/// SIGHUP: resolves the configuration again and applies it, logging one line: what
/// changed, or the error that kept the running configuration.
fn reload(server: &mut Server, argv: &[OsString]) {
    let (cfg, level) = match load_settings(argv) {
        Ok(x) => x,
        Err(e) => {
            let why = gcb_proto::error_line(e.as_ref());
            tracing::error!("{}", lifecycle::refused_line(&why));
            return;
        }
    };
    let level_change = logging::change_level(level);
    let changes = server.reconfigure(cfg);
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
    logging::init("gcb-brokerd", args.log, Output::Buffered);
    if let Some(path) = &args.generate_key {
        keyfile::generate(path)?;
        eprintln!("gcb-brokerd: wrote a new pool key to {}", path.display());
        return Ok(());
    }
    let (cfg, _) = settings(args)?;
    if layered.check_config {
        print!("{}", layered.check_report("gcb-brokerd"));
        return Ok(());
    }
    logging::flush();
    let signals = Signals::install()?;
    raise_fd_limit();
    let mut server = Server::bind(cfg)?;
    let admin = gcb_ops::admin_socket_arg(args.admin_socket.as_deref(), "brokerd");
    server.open_ops(admin.as_deref(), args.metrics)?;
    if let Some(ops) = server.ops() {
        if let Some(p) = ops.admin_path() {
            logging::always(&format!("admin socket {}", p.display()));
        }
        if let Some(m) = ops.metrics_addr() {
            logging::always(&format!("metrics on http://{m}/metrics"));
        }
    }
    let a = server.local_addr();
    logging::always(&format!("listening on udp {a}, relay tcp {a}"));
    loop {
        let end = server.run(&signals);
        logging::flush();
        match end? {
            RunEnd::Exit => return Ok(()),
            RunEnd::Reload => reload(&mut server, &argv),
        }
    }
}
