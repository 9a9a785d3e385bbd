//! `gcb-dpf-request`: send DPF requests to a `gcb-portfwd` and print the
//! replies as JSON, one line each. An operator's and tester's tool: it
//! speaks exactly the protocol the libgcb shim speaks.
//!
//! Exit status: 0 for a non-error reply, 2 for an `error` reply, 1 when no
//! reply came or the tool itself failed.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gcb_portfwd::client::Client;
use gcb_portfwd::server::DEFAULT_PORT;
use gcb_proto::addr::endpoint_arg;
use gcb_proto::{Body, PoolKey, Transport};

/// Send one DPF request (forward, delete, query) to gcb-portfwd and print
/// the reply body as one JSON line.
#[derive(Parser, Debug)]
#[command(name = "gcb-dpf-request", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GCB_GIT_COMMIT"), ")"))]
struct Args {
    /// The server, `IP[:PORT]` (default port 9651).
    #[arg(long, value_name = "IP[:PORT]", value_parser = endpoint_arg::<DEFAULT_PORT>)]
    server: SocketAddr,
    /// Pool key file (as the server's --key-file).
    #[arg(long, value_name = "FILE", env = "GCB_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Local address of the control socket (default: any; port 0 or none:
    /// any port).
    #[arg(long, value_name = "IP[:PORT]", value_parser = endpoint_arg::<0>)]
    bind: Option<SocketAddr>,
    /// Give up on a request after SECS seconds without a reply (default: 3 for one
    /// request, the protocol's 10 with --count).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Ask for a public port forwarded to PRIVATE (ip:port).
    Forward {
        /// The private address (must be this host's: the server checks it
        /// against the request's source).
        private: SocketAddr,
        /// UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        /// Desired public port.
        #[arg(long, value_name = "PORT")]
        desired_port: Option<u16>,
        /// Port of an existing management socket on PRIVATE's IP. Without
        /// it (or with --hold) this tool opens one itself.
        #[arg(long, value_name = "PORT")]
        probe_port: Option<u16>,
        /// Keep running (and keep the management socket open, accepting
        /// and closing the server's probes) until killed: the mapping lives
        /// as long as this process.
        #[arg(long)]
        hold: bool,
        /// Forward COUNT consecutive private ports starting at PRIVATE's
        /// (benchmarks); prints one summary line.
        #[arg(long, default_value_t = 1)]
        count: u16,
        /// Requests in flight at once with --count (1: sequential, and the
        /// summary includes median and p99 latency).
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// Delete the mapping of PRIVATE.
    Delete {
        /// The private address.
        private: SocketAddr,
        /// UDP instead of TCP.
        #[arg(long)]
        udp: bool,
    },
    /// Ask which private address PUBLIC (ip:port) forwards to.
    Query {
        /// The public address.
        public: SocketAddr,
        /// UDP instead of TCP.
        #[arg(long)]
        udp: bool,
    },
}

fn transport(udp: bool) -> Transport {
    if udp {
        Transport::Udp
    } else {
        Transport::Tcp
    }
}

fn print(body: &Body) -> i32 {
    let json =
        serde_json::to_string(body).unwrap_or_else(|e| format!("{{\"print_error\":\"{e}\"}}"));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let _ = out.flush();
    if matches!(body, Body::Error { .. }) {
        2
    } else {
        0
    }
}

/// Errors end the process with one line (the context chain), exit status 1, and no
/// backtrace even when RUST_BACKTRACE is set: an administrator reads this, not a developer.
fn main() {
    if let Err(e) = run() {
        eprintln!(
            "gcb-dpf-request: error: {}",
            gcb_proto::error_line(e.as_ref())
        );
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    // The hidden --generate-man DIR / --generate-completions DIR (packaging).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    gcb_proto::conf::exit_if_docs_requested::<Args>(&argv, "1", &["gcb-portfwd(8)", "libgcb(7)"])?;
    let args = Args::parse();
    let key = match &args.key_file {
        Some(p) => Some(
            PoolKey::from_file_contents(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .context("key file")?,
        ),
        None => None,
    };
    let mut client =
        Client::new(args.server, args.bind, key).context("binding the control socket")?;
    let many = matches!(args.cmd, Cmd::Forward { count, .. } if count > 1);
    let timeout = match args.timeout {
        Some(s) if s.is_finite() && s > 0.0 => Some(s),
        Some(s) => anyhow::bail!("--timeout {s}: give a positive number of seconds"),
        None => (!many).then_some(3.0),
    };
    if let Some(s) = timeout {
        client.set_request_deadline(std::time::Duration::from_secs_f64(s));
    }
    let server = args.server;
    // What to say when nothing answered: which address, and the usual reasons.
    let no_reply = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            eprintln!(
                "gcb-dpf-request: error: nothing answered at {server} within {} s (is gcb-portfwd running there, on that port, with the same pool key?)",
                timeout.unwrap_or(10.0)
            );
        } else {
            eprintln!("gcb-dpf-request: error: {server}: {e}");
        }
        1
    };
    let code = match args.cmd {
        Cmd::Forward {
            private,
            udp,
            desired_port,
            probe_port,
            hold,
            count,
            window,
        } => {
            let mut mgmt = None;
            let probe_port = match probe_port {
                Some(p) if !hold => p,
                p => {
                    let l = TcpListener::bind((private.ip(), p.unwrap_or(0)))
                        .context("opening the management socket")?;
                    let port = l.local_addr()?.port();
                    mgmt = Some(l);
                    port
                }
            };
            if let Some(l) = mgmt.as_ref().and_then(|l| l.try_clone().ok()) {
                // Drain the probes so the accept queue never fills.
                std::thread::spawn(move || {
                    for c in l.incoming() {
                        drop(c);
                    }
                });
            }
            let t = transport(udp);
            let code = if count <= 1 {
                let reply = client.request(Body::Forward {
                    transport: t,
                    private,
                    desired_public_port: desired_port,
                    probe_port,
                });
                match reply {
                    Ok(b) => print(&b),
                    Err(e) => no_reply(e),
                }
            } else {
                let bodies: Vec<Body> = (0..count)
                    .map(|i| Body::Forward {
                        transport: t,
                        private: SocketAddr::new(private.ip(), private.port().wrapping_add(i)),
                        desired_public_port: desired_port.map(|d| d.wrapping_add(i)),
                        probe_port,
                    })
                    .collect();
                let start = Instant::now();
                let mut lat_us: Vec<u64> = Vec::new();
                let replies = if window <= 1 {
                    // sequential: per-request latency
                    let mut v = Vec::new();
                    for b in bodies {
                        let t = Instant::now();
                        v.push(client.request(b).ok());
                        lat_us.push(t.elapsed().as_micros() as u64);
                    }
                    v
                } else {
                    client.request_many(bodies, window)?
                };
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                lat_us.sort_unstable();
                let pct = |q: f64| {
                    lat_us
                        .get(((lat_us.len() as f64 - 1.0) * q).round() as usize)
                        .map(|v| v.to_string())
                        .unwrap_or("null".into())
                };
                let ok = replies
                    .iter()
                    .filter(|r| matches!(r, Some(Body::Forwarded { .. })))
                    .count();
                let none = replies.iter().filter(|r| r.is_none()).count();
                let first_err = replies
                    .iter()
                    .flatten()
                    .find(|r| matches!(r, Body::Error { .. }));
                println!(
                    "{{\"count\":{count},\"forwarded\":{ok},\"timeouts\":{none},\"elapsed_ms\":{ms:.1},\"median_us\":{},\"p99_us\":{},\"first_error\":{}}}",
                    pct(0.5),
                    pct(0.99),
                    first_err.map(|b| serde_json::to_string(b).unwrap_or_default()).unwrap_or("null".into())
                );
                if ok == usize::from(count) {
                    0
                } else {
                    2
                }
            };
            if hold {
                let _keep = mgmt;
                loop {
                    std::thread::park();
                }
            }
            code
        }
        Cmd::Delete { private, udp } => match client.request(Body::Delete {
            transport: transport(udp),
            private,
        }) {
            Ok(b) => print(&b),
            Err(e) => no_reply(e),
        },
        Cmd::Query { public, udp } => match client.request(Body::Query {
            transport: transport(udp),
            public,
        }) {
            Ok(b) => print(&b),
            Err(e) => no_reply(e),
        },
    };
    std::process::exit(code);
}
