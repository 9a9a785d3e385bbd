//! Benchmark helper for `scripts/bench`: connection time as issue 6 defines it, and echo
//! time of a fixed payload, with plain sockets (run it under `gcb-run` to measure GCB/DPF).
//!
//! * `serve --bind IP:PORT [--udp]`: prints `listening on <getsockname()>`. TCP: one thread
//!   per connection; on accept the server writes ONE byte (`G`), then echoes until EOF.
//!   UDP: echoes every datagram to its sender.
//! * `client ADDR --count K --size S [--udp]`: K times: socket() -> connect() -> the
//!   server's first byte arrives (= connection time; a relay that accepts before the far
//!   side exists cannot look fast), then S random bytes are echoed and verified on that
//!   connection (= echo time); close. UDP: socket() -> first 1-byte datagram echoed
//!   (connection time, as in the paper), then an S-byte datagram echoed (echo time).
//!   `--unconnected`: UDP with sendto()/recvfrom() to ADDR instead of connect() (the way
//!   GCB-to-GCB hole punching applies; replies from other addresses are ignored).
//!   `--warm-ms M`: between the two, wait M ms in recv() (idle, as a program waiting for
//!   its next message; the shim's event handler runs there), so the echo time is that of
//!   the settled channel, e.g. after a hole punch; one untimed 1-byte echo follows, so the
//!   timed one does not pay the CPUs' wake-up from idle. (Not a busy echo loop: on this
//!   VM a busy ping-pong leaves the next round trips 2-3x slower, plain sockets included.)
//!   Prints `{"ok":true,"connect_us":[..],"echo_us":[..]}`.
//! * `hold ADDR --conns N --size S`: opens N connections one after another and keeps them
//!   ALL open (each got the server's first byte), then echoes S random bytes on every one
//!   and verifies them, then closes all. Prints `{"ok":..,"opened":..,"verified":..}`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use gcb_examples::{die, random_bytes, say};
use serde_json::json;

const PROG: &str = "gcb-bench-conn";

#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve: greet each TCP connection with one byte, then echo; or echo UDP datagrams.
    Serve {
        #[arg(long, default_value = "0.0.0.0:0")]
        bind: SocketAddr,
        #[arg(long)]
        udp: bool,
    },
    /// Measure connection and echo times.
    Client {
        addr: SocketAddr,
        #[arg(long, default_value_t = 20)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long)]
        udp: bool,
        /// UDP: sendto()/recvfrom() instead of connect() + send()/recv().
        #[arg(long)]
        unconnected: bool,
        /// UDP: wait this many ms in recv() before timing the echo.
        #[arg(long, default_value_t = 0)]
        warm_ms: u64,
        /// Per-operation timeout (seconds).
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Hold N concurrent connections open and verify data on each.
    Hold {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 20)]
        timeout: u64,
        /// Keep the connections open this many seconds after printing the result.
        #[arg(long, default_value_t = 0)]
        linger: u64,
    },
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn serve(bind: SocketAddr, udp: bool) -> ! {
    if udp {
        let s = UdpSocket::bind(bind).unwrap_or_else(|e| die(PROG, format!("bind {bind}: {e}")));
        let a = s.local_addr().unwrap_or_else(|e| die(PROG, e));
        say(PROG, format_args!("listening on {a}"));
        let mut buf = vec![0u8; 65536];
        loop {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let _ = s.send_to(&buf[..n], from);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => die(PROG, format!("recv: {e}")),
            }
        }
    }
    let l = TcpListener::bind(bind).unwrap_or_else(|e| die(PROG, format!("bind {bind}: {e}")));
    let a = l.local_addr().unwrap_or_else(|e| die(PROG, e));
    say(PROG, format_args!("listening on {a}"));
    loop {
        match l.accept() {
            Ok((s, _)) => {
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let _ = greet_echo(s);
                    })
                    .unwrap_or_else(|e| die(PROG, format!("spawn: {e}")));
            }
            Err(e) => eprintln!("{PROG}: accept: {e}"),
        }
    }
}

fn greet_echo(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.write_all(b"G")?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
    }
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// socket()+connect() (std does both in one call) -> first byte from the server.
fn open(addr: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| ctx(e, "connect"))?;
    s.set_read_timeout(Some(timeout))?;
    let mut g = [0u8; 1];
    s.read_exact(&mut g).map_err(|e| ctx(e, "first byte"))?;
    let dt = t0.elapsed();
    if g[0] != b'G' {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad greeting byte",
        ));
    }
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok((s, dt))
}

fn echo_tcp(s: &mut TcpStream, data: &[u8]) -> io::Result<Duration> {
    let mut back = vec![0u8; data.len()];
    let t0 = Instant::now();
    s.write_all(data).map_err(|e| ctx(e, "send"))?;
    s.read_exact(&mut back)
        .map_err(|e| ctx(e, "receive echo"))?;
    let dt = t0.elapsed();
    if back != data {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo mismatch"));
    }
    Ok(dt)
}

/// Sends `data` (to `to`, unconnected; else on the connected socket) and waits for the
/// identical datagram, retrying on timeout (up to 5 tries).
fn echo_udp(s: &UdpSocket, to: Option<SocketAddr>, data: &[u8]) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    for _ in 0..5 {
        match to {
            Some(a) => s.send_to(data, a),
            None => s.send(data),
        }
        .map_err(|e| ctx(e, "send"))?;
        loop {
            let got = match to {
                Some(a) => s.recv_from(&mut buf).map(|(n, from)| (n, from == a)),
                None => s.recv(&mut buf).map(|n| (n, true)),
            };
            match got {
                Ok((n, true)) if &buf[..n] == data => return Ok(()),
                Ok(_) => continue, // a late echo of an earlier try, or another sender
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(ctx(e, "recv")),
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no udp echo after 5 tries",
    ))
}

/// How a UDP client runs.
#[derive(Clone, Copy)]
struct UdpMode {
    unconnected: bool,
    warm: Duration,
}

fn client(
    addr: SocketAddr,
    count: usize,
    size: usize,
    udp: Option<UdpMode>,
    timeout: Duration,
) -> io::Result<serde_json::Value> {
    let mut conn = Vec::with_capacity(count);
    let mut echo = Vec::with_capacity(count);
    for i in 0..count {
        let data = random_bytes(size)?;
        if let Some(mode) = udp {
            let t0 = Instant::now();
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let s = UdpSocket::bind(bind)?;
            let to = if mode.unconnected {
                Some(addr)
            } else {
                s.connect(addr)?;
                None
            };
            s.set_read_timeout(Some(timeout.min(Duration::from_secs(1))))?;
            let hello = [b'h', (i & 0xff) as u8];
            echo_udp(&s, to, &hello)?;
            conn.push(us(t0.elapsed()));
            if !mode.warm.is_zero() {
                let until = Instant::now() + mode.warm;
                let mut buf = [0u8; 64];
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    s.set_read_timeout(Some(left))?;
                    // Nothing is expected: a stray late echo is simply dropped.
                    match s.recv_from(&mut buf) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(ctx(e, "recv (warm)")),
                    }
                }
                s.set_read_timeout(Some(timeout.min(Duration::from_secs(1))))?;
                // One untimed round trip first: the first after an idle spell pays the
                // CPUs' wake-up from idle (2-3x here, plain sockets too), not the path.
                echo_udp(&s, to, b"w")?;
            }
            let t1 = Instant::now();
            echo_udp(&s, to, &data)?;
            echo.push(us(t1.elapsed()));
        } else {
            let (mut s, dt) = open(addr, timeout)?;
            conn.push(us(dt));
            echo.push(us(echo_tcp(&mut s, &data)?));
        }
    }
    Ok(json!({"ok": true, "connect_us": conn, "echo_us": echo}))
}

fn hold(
    addr: SocketAddr,
    n: usize,
    size: usize,
    timeout: Duration,
) -> (serde_json::Value, Vec<TcpStream>) {
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut err = None;
    for _ in 0..n {
        match open(addr, timeout) {
            Ok((s, _)) => conns.push(s),
            Err(e) => {
                err = Some(format!("open #{}: {e}", conns.len() + 1));
                break;
            }
        }
    }
    let open_ms = t0.elapsed().as_millis() as u64;
    let mut verified = 0usize;
    if err.is_none() {
        for (i, s) in conns.iter_mut().enumerate() {
            let data = match random_bytes(size) {
                Ok(d) => d,
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            };
            match echo_tcp(s, &data) {
                Ok(_) => verified += 1,
                Err(e) => {
                    err = Some(format!("echo on #{}: {e}", i + 1));
                    break;
                }
            }
        }
    }
    let total_ms = t0.elapsed().as_millis() as u64;
    (
        json!({"ok": err.is_none() && verified == n, "requested": n, "opened": conns.len(),
           "verified": verified, "bytes_each": size, "open_ms": open_ms, "total_ms": total_ms,
           "error": err}),
        conns,
    )
}

fn main() {
    let args = Args::parse();
    match args.cmd {
        Cmd::Serve { bind, udp } => serve(bind, udp),
        Cmd::Client {
            addr,
            count,
            size,
            udp,
            unconnected,
            warm_ms,
            timeout,
        } => match client(
            addr,
            count,
            size,
            udp.then_some(UdpMode {
                unconnected,
                warm: Duration::from_millis(warm_ms),
            }),
            Duration::from_secs(timeout),
        ) {
            Ok(v) => say(PROG, v),
            Err(e) => {
                say(PROG, json!({"ok": false, "error": e.to_string()}));
                std::process::exit(1);
            }
        },
        Cmd::Hold {
            addr,
            conns,
            size,
            timeout,
            linger,
        } => {
            let (v, held) = hold(addr, conns, size, Duration::from_secs(timeout));
            let ok = v["ok"].as_bool().unwrap_or(false);
            say(PROG, v);
            std::thread::sleep(Duration::from_secs(linger));
            drop(held);
            if !ok {
                std::process::exit(1);
            }
        }
    }
}
