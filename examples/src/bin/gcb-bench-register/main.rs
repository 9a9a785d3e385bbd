//! Load generator for `scripts/bench`: speaks the GCB control protocol to gcb-brokerd with
//! gcb-proto's `Endpoint` (reliable UDP, keyed with `--key-file` / `GCB_KEY_FILE` as a
//! shim is), without real listening sockets.
//!
//! * `register --count N --window W`: registers N TCP listeners (distinct local ports on
//!   the bind IP, one control socket = one client), W requests in flight; a `busy` answer
//!   is retried after 20 ms. Prints one JSON line (rate, errors, when the first `busy`
//!   came), then keeps the registrations alive with heartbeats for `--hold-secs`
//!   (so the caller can read the broker's memory), then exits.
//! * `fleet --clients C --per-client N`: C shim-like clients with N listeners each: the
//!   registration rate, then heartbeats and the re-registration storm after a broker
//!   restart, re-registering exactly as the shim does (see the `fleet` module).
//! * `listen`: registers ONE listener, prints `{"proxy":..}`, then acks every
//!   `connect_back` (without dialing) and heartbeats, until killed.
//! * `connect --proxy P --duration S --window W [--connector-listen A]`: sends
//!   `connect_request`s for P with W in flight for S seconds; prints decisions per second
//!   by route and errors by code.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use gcb_examples::{die, random_bytes, say};
use gcb_proto::msg::heartbeat_batches;
use gcb_proto::{Body, Config, Endpoint, Event, Now, PoolKey, RequestId, Route, Transport};
use serde_json::json;

mod fleet;

const PROG: &str = "gcb-bench-register";

#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    /// Broker control address, IP[:PORT] (port 9650 by default).
    #[arg(long, value_parser = gcb_proto::addr::endpoint_arg::<9650>)]
    broker: SocketAddr,
    /// Local IP to bind the control socket to (also the registrations' local IP).
    #[arg(long)]
    bind: IpAddr,
    /// The pool key file (as the broker's); without it, requests go unkeyed.
    #[arg(long, value_name = "FILE", env = "GCB_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Register {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 128)]
        window: usize,
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 180)]
        max_secs: u64,
    },
    /// Many shim-like clients: registration rate, then the re-registration storm after a
    /// broker restart (see the `fleet` module).
    Fleet {
        /// Clients (processes: one control socket each).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// TCP listeners registered per client.
        #[arg(long, default_value_t = 100)]
        per_client: usize,
        /// Register requests in flight at most while first registering.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Heartbeat interval (ms), as the shim's GCB_HEARTBEAT_MS.
        #[arg(long, default_value_t = 10_000)]
        heartbeat_ms: u64,
        /// Heartbeat phases drawn from [0, this) ms (default: the interval; 0: in step).
        #[arg(long)]
        phase_spread_ms: Option<u64>,
        /// Park a standby connection per listener (the shim's default).
        #[arg(long)]
        standby: bool,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
    },
    Listen {
        #[arg(long, default_value_t = 7777)]
        port: u16,
    },
    Connect {
        #[arg(long)]
        proxy: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long)]
        connector_listen: Option<SocketAddr>,
    },
}

fn now() -> Now {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Now {
        mono: Instant::now(),
        unix_ms,
    }
}

struct Gen {
    sock: UdpSocket,
    ep: Endpoint,
    broker: SocketAddr,
    connect_backs: u64,
}

impl Gen {
    fn new(bind: IpAddr, broker: SocketAddr, key: Option<PoolKey>) -> io::Result<Gen> {
        let sock = UdpSocket::bind(SocketAddr::new(bind, 0))?;
        let r = random_bytes(8)?;
        let session = u64::from_le_bytes(r.try_into().unwrap_or([7; 8]));
        let cfg = Config {
            max_outstanding: 4096,
            ..Config::default()
        };
        Ok(Gen {
            sock,
            ep: Endpoint::new(cfg, key, session),
            broker,
            connect_backs: 0,
        })
    }

    fn flush(&mut self) {
        while let Some(t) = self.ep.poll_transmit() {
            let _ = self.sock.send_to(&t.payload, t.to);
        }
    }

    /// Sends what is queued, waits up to `wait` for datagrams, runs timers; returns the
    /// responses/timeouts (requests from the broker are answered here).
    fn pump(&mut self, wait: Duration) -> Vec<Event> {
        self.flush();
        let wait = match self.ep.poll_timeout() {
            Some(t) => wait.min(t.saturating_duration_since(Instant::now())),
            None => wait,
        }
        .max(Duration::from_micros(100));
        let _ = self.sock.set_read_timeout(Some(wait));
        let mut buf = [0u8; 2048];
        let mut first = true;
        loop {
            if !first {
                let _ = self.sock.set_nonblocking(true);
            }
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => self.ep.handle_datagram(now(), from, &buf[..n]),
                Err(_) => break,
            }
            first = false;
        }
        let _ = self.sock.set_nonblocking(false);
        self.ep.handle_timeout(now());
        let mut out = Vec::new();
        while let Some(ev) = self.ep.poll_event() {
            match ev {
                Event::Request { from, id, body } => {
                    if matches!(body, Body::ConnectBack { .. }) {
                        self.connect_backs += 1;
                    }
                    let _ = self.ep.respond(now(), from, id, Body::Ack {});
                }
                other => out.push(other),
            }
        }
        self.flush();
        out
    }

    fn request(&mut self, body: Body) -> Option<RequestId> {
        self.ep.send_request(now(), self.broker, body).ok()
    }
}

fn code_of(body: &Body) -> String {
    match body {
        Body::Error { code, .. } => code.to_string(),
        other => other.type_name().to_owned(),
    }
}

fn register(g: &mut Gen, bind: IpAddr, count: usize, window: usize, hold: u64, max_secs: u64) {
    let mut todo: VecDeque<usize> = (0..count).collect();
    let mut retry: VecDeque<(Instant, usize)> = VecDeque::new();
    let mut inflight: HashMap<RequestId, usize> = HashMap::new();
    let mut proxies = Vec::with_capacity(count);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_busy: Option<(usize, f64)> = None;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(max_secs);
    let local = |i: usize| SocketAddr::new(bind, 1024 + (i % 60_000) as u16);
    while (proxies.len() + errors.get("fatal").copied().unwrap_or(0) as usize) < count
        && Instant::now() < deadline
    {
        while let Some(&(t, i)) = retry.front() {
            if t > Instant::now() {
                break;
            }
            retry.pop_front();
            todo.push_front(i);
        }
        while inflight.len() < window {
            let Some(i) = todo.pop_front() else { break };
            let body = Body::Register {
                transport: Transport::Tcp,
                local: local(i),
                previous_proxy: None,
                previous_token: None,
                punch: false,
            };
            match g.request(body) {
                Some(id) => {
                    inflight.insert(id, i);
                }
                None => {
                    todo.push_front(i);
                    break;
                }
            }
        }
        for ev in g.pump(Duration::from_millis(2)) {
            let (req, body) = match ev {
                Event::Response { request, body, .. } => (request, Some(body)),
                Event::Timeout { request, .. } => (request, None),
                Event::Request { .. } => continue,
            };
            let Some(i) = inflight.remove(&req) else {
                continue;
            };
            match body {
                Some(Body::Registered { proxy, .. }) => proxies.push(proxy),
                Some(b) => {
                    let c = code_of(&b);
                    *errors.entry(c.clone()).or_default() += 1;
                    if c == "busy" || c == "internal" {
                        if first_busy.is_none() {
                            first_busy = Some((proxies.len(), t0.elapsed().as_secs_f64()));
                        }
                        retry.push_back((Instant::now() + Duration::from_millis(20), i));
                    } else {
                        *errors.entry("fatal".into()).or_default() += 1;
                    }
                }
                None => {
                    *errors.entry("timeout".into()).or_default() += 1;
                    retry.push_back((Instant::now(), i));
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    say(
        PROG,
        json!({"ok": proxies.len() == count, "requested": count, "registered": proxies.len(),
               "elapsed_s": secs, "rate_per_s": proxies.len() as f64 / secs,
               "window": window, "errors": errors,
               "first_busy_after": first_busy.map(|(n, _)| n),
               "first_busy_at_s": first_busy.map(|(_, s)| s),
               "rate_before_first_busy": first_busy.map(|(n, s)| n as f64 / s.max(1e-9))}),
    );
    let _ = io::stdout().flush();
    let end = Instant::now() + Duration::from_secs(hold);
    let mut next_hb = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_hb {
            for b in heartbeat_batches(&proxies) {
                let _ = g.request(b);
            }
            next_hb = Instant::now() + Duration::from_secs(5);
        }
        let _ = g.pump(Duration::from_millis(50));
    }
}

fn register_one(g: &mut Gen, local: SocketAddr) -> SocketAddr {
    let _ = g.request(Body::Register {
        transport: Transport::Tcp,
        local,
        previous_proxy: None,
        previous_token: None,
        punch: false,
    });
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        for ev in g.pump(Duration::from_millis(20)) {
            match ev {
                Event::Response {
                    body: Body::Registered { proxy, .. },
                    ..
                } => return proxy,
                Event::Response { body, .. } => die(PROG, format!("register: {}", code_of(&body))),
                Event::Timeout { .. } => die(PROG, "register: timeout"),
                Event::Request { .. } => {}
            }
        }
    }
    die(PROG, "register: no answer")
}

fn listen(g: &mut Gen, bind: IpAddr, port: u16) -> ! {
    let proxy = register_one(g, SocketAddr::new(bind, port));
    say(PROG, json!({"proxy": proxy.to_string()}));
    let mut next_hb = Instant::now() + Duration::from_secs(5);
    let mut last = 0;
    loop {
        let _ = g.pump(Duration::from_millis(100));
        if Instant::now() >= next_hb {
            for b in heartbeat_batches(&[proxy]) {
                let _ = g.request(b);
            }
            next_hb = Instant::now() + Duration::from_secs(5);
            if g.connect_backs != last {
                last = g.connect_backs;
                eprintln!("{PROG}: connect_backs acked: {last}");
            }
        }
    }
}

fn connect(
    g: &mut Gen,
    bind: IpAddr,
    proxy: SocketAddr,
    duration: f64,
    window: usize,
    cl: Option<SocketAddr>,
) {
    let local = SocketAddr::new(bind, g.sock.local_addr().map(|a| a.port()).unwrap_or(1));
    let mut inflight: HashMap<RequestId, Instant> = HashMap::new();
    let mut routes: BTreeMap<String, u64> = BTreeMap::new();
    let mut lat_us: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(duration);
    let mut sent = 0u64;
    let mut first_busy: Option<(u64, f64)> = None;
    while Instant::now() < end
        || (!inflight.is_empty() && t0.elapsed().as_secs_f64() < duration + 12.0)
    {
        while Instant::now() < end && inflight.len() < window {
            let body = Body::ConnectRequest {
                proxy,
                transport: Transport::Tcp,
                connector_local: local,
                connector_listen: cl,
                punch: false,
            };
            match g.request(body) {
                Some(id) => {
                    inflight.insert(id, Instant::now());
                    sent += 1;
                }
                None => break,
            }
        }
        for ev in g.pump(Duration::from_millis(2)) {
            let (req, key) = match ev {
                Event::Response { request, body, .. } => (
                    request,
                    match body {
                        Body::ConnectDecision {
                            route: Route::Direct { .. },
                        } => "direct".to_owned(),
                        Body::ConnectDecision {
                            route: Route::Reverse { .. },
                        } => "reverse".to_owned(),
                        Body::ConnectDecision {
                            route: Route::Relay { .. },
                        } => "relay".to_owned(),
                        other => format!("error:{}", code_of(&other)),
                    },
                ),
                Event::Timeout { request, .. } => (request, "timeout".to_owned()),
                Event::Request { .. } => continue,
            };
            if let Some(t) = inflight.remove(&req) {
                if key == "error:busy" && first_busy.is_none() {
                    let ok: u64 = routes
                        .iter()
                        .filter(|(k, _)| !k.starts_with("error") && *k != "timeout")
                        .map(|(_, v)| v)
                        .sum();
                    first_busy = Some((ok, t0.elapsed().as_secs_f64()));
                }
                if !key.starts_with("error") && key != "timeout" {
                    lat_us.push(t.elapsed().as_micros() as u64);
                }
                *routes.entry(key).or_default() += 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64().min(duration).max(1e-9);
    let ok: u64 = routes
        .iter()
        .filter(|(k, _)| !k.starts_with("error") && *k != "timeout")
        .map(|(_, v)| v)
        .sum();
    lat_us.sort_unstable();
    let med = lat_us.get(lat_us.len() / 2).copied();
    let p99 = lat_us.get(lat_us.len() * 99 / 100).copied();
    say(
        PROG,
        json!({"ok": ok > 0, "sent": sent, "decisions": ok, "duration_s": secs,
               "decisions_per_s": ok as f64 / secs, "window": window, "by_route": routes,
               "latency_us_median": med, "latency_us_p99": p99,
               "first_busy_after": first_busy.map(|(n, _)| n),
               "first_busy_at_s": first_busy.map(|(_, s)| s),
               "rate_before_first_busy": first_busy.map(|(n, s)| n as f64 / s.max(1e-9)),
               "retransmits": g.ep.stats().retransmits}),
    );
}

fn main() {
    let args = Args::parse();
    let key = args.key_file.as_ref().map(|path| {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| die(PROG, format!("key file {}: {e}", path.display())));
        PoolKey::from_file_contents(&bytes)
            .unwrap_or_else(|e| die(PROG, format!("key file {}: {e}", path.display())))
    });
    if let Cmd::Fleet {
        clients,
        per_client,
        window,
        heartbeat_ms,
        phase_spread_ms,
        standby,
        max_secs,
    } = args.cmd
    {
        return fleet::fleet(fleet::FleetArgs {
            broker: args.broker,
            bind: args.bind,
            key,
            clients,
            per_client,
            window,
            heartbeat: Duration::from_millis(heartbeat_ms.max(50)),
            phase_spread: Duration::from_millis(phase_spread_ms.unwrap_or(heartbeat_ms)),
            standby,
            max_secs,
        });
    }
    let mut g = Gen::new(args.bind, args.broker, key).unwrap_or_else(|e| die(PROG, e));
    match args.cmd {
        Cmd::Fleet { .. } => unreachable!("handled above"),
        Cmd::Register {
            count,
            window,
            hold_secs,
            max_secs,
        } => register(&mut g, args.bind, count, window, hold_secs, max_secs),
        Cmd::Listen { port } => listen(&mut g, args.bind, port),
        Cmd::Connect {
            proxy,
            duration,
            window,
            connector_listen,
        } => connect(&mut g, args.bind, proxy, duration, window, connector_listen),
    }
}
