//! The echo client of the paper's test suite (section 5), with plain sockets.
//!
//! Connects to ADDR, sends SIZE random bytes, reads the echo and checks it byte for byte,
//! COUNT times: a new connection each time (default), or all on one connection
//! (`--one-connection`). Prints one JSON line on stdout:
//! `{"ok":true,"connect_us_median":..,"echo_us_median":..,...}`, or `{"ok":false,"error":..}`
//! and exits 1 on any error or mismatch. As in the paper, connection time runs from socket
//! creation to connection establishment, echo time from the first byte sent to the last
//! byte received.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use gcb_examples::{median, parse_secs, random_bytes};
use serde_json::json;

const PROG: &str = "gcb-echo-client";

/// Echo client: sends random bytes to an echo server and verifies what comes back.
#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    /// Server address, HOST:PORT.
    addr: String,
    /// Bytes per echo.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Number of echoes.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Only connect and close, COUNT times (measures connection setup).
    #[arg(long, conflicts_with = "one_connection")]
    connect_only: bool,
    /// Do all echoes on one connection instead of a new connection per echo.
    #[arg(long)]
    one_connection: bool,
    /// UDP: one datagram of SIZE bytes per echo (SIZE <= 65507), retried on loss.
    #[arg(long, conflicts_with_all = ["connect_only", "one_connection"])]
    udp: bool,
    /// Read/write timeout in seconds (UDP: per attempt).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    timeout: Duration,
    /// Connect timeout in seconds (non-blocking connect + poll); default: a plain
    /// blocking connect(), as most legacy programs do.
    #[arg(long, value_parser = parse_secs)]
    connect_timeout: Option<Duration>,
}

#[derive(Default)]
struct Stats {
    connect_us: Vec<u64>,
    echo_us: Vec<u64>,
    bytes: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address found")))
}

fn connect(args: &Args, addr: SocketAddr, stats: &mut Stats) -> io::Result<TcpStream> {
    let t0 = Instant::now();
    let s = match args.connect_timeout {
        Some(t) => TcpStream::connect_timeout(&addr, t),
        None => TcpStream::connect(addr),
    }
    .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
    stats.connect_us.push(micros(t0.elapsed()));
    s.set_read_timeout(Some(args.timeout))?;
    s.set_write_timeout(Some(args.timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `data` and reads the echo (a writer thread, so a large payload cannot deadlock
/// on full socket buffers); checks it byte for byte.
fn echo_once(s: &TcpStream, data: &[u8], stats: &mut Stats) -> io::Result<()> {
    let mut back = vec![0u8; data.len()];
    let t0 = Instant::now();
    std::thread::scope(|scope| -> io::Result<()> {
        let mut w = s;
        let writer = scope.spawn(move || w.write_all(data));
        let mut r = s;
        let read = r.read_exact(&mut back);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
        wrote.map_err(|e| io::Error::new(e.kind(), format!("send: {e}")))?;
        read.map_err(|e| io::Error::new(e.kind(), format!("receive echo: {e}")))
    })?;
    stats.echo_us.push(micros(t0.elapsed()));
    check(data, &back)?;
    stats.bytes += data.len() as u64;
    Ok(())
}

fn check(sent: &[u8], back: &[u8]) -> io::Result<()> {
    if let Some(i) = sent.iter().zip(back).position(|(a, b)| a != b) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo mismatch at byte {i} of {}", sent.len()),
        ));
    }
    if sent.len() != back.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo length {} != {}", back.len(), sent.len()),
        ));
    }
    Ok(())
}

/// Half-closes and expects the server to close too, with nothing more to read.
fn finish(mut s: TcpStream) -> io::Result<()> {
    s.shutdown(Shutdown::Write)?;
    let mut extra = [0u8; 1];
    match s.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "server sent more bytes than were echoed",
        )),
        Err(e) => Err(io::Error::new(e.kind(), format!("waiting for close: {e}"))),
    }
}

fn run_tcp(args: &Args, addr: SocketAddr, stats: &mut Stats) -> io::Result<()> {
    if args.connect_only {
        for _ in 0..args.count {
            drop(connect(args, addr, stats)?);
        }
        return Ok(());
    }
    let payloads = (0..args.count)
        .map(|_| random_bytes(args.size))
        .collect::<io::Result<Vec<_>>>()?;
    if args.one_connection {
        let s = connect(args, addr, stats)?;
        for (i, data) in payloads.iter().enumerate() {
            echo_once(&s, data, stats).map_err(|e| annotate(e, i))?;
        }
        finish(s)
    } else {
        for (i, data) in payloads.iter().enumerate() {
            let s = connect(args, addr, stats).map_err(|e| annotate(e, i))?;
            echo_once(&s, data, stats).map_err(|e| annotate(e, i))?;
            finish(s).map_err(|e| annotate(e, i))?;
        }
        Ok(())
    }
}

fn run_udp(args: &Args, addr: SocketAddr, stats: &mut Stats) -> io::Result<()> {
    if args.size > 65507 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "UDP size must be at most 65507",
        ));
    }
    let t0 = Instant::now();
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    } else {
        "[::]:0".parse().map_err(io::Error::other)?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(addr)?;
    stats.connect_us.push(micros(t0.elapsed()));
    sock.set_read_timeout(Some(args.timeout))?;
    let mut back = vec![0u8; 65536];
    for i in 0..args.count {
        let data = random_bytes(args.size)?;
        let t0 = Instant::now();
        let mut attempts = 0;
        let n = loop {
            attempts += 1;
            sock.send(&data)?;
            match sock.recv(&mut back) {
                // A late echo of an earlier attempt has the same content: fine.
                Ok(n) => break n,
                Err(e)
                    if attempts < 5
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                Err(e) => return Err(annotate(io::Error::new(e.kind(), format!("recv: {e}")), i)),
            }
        };
        stats.echo_us.push(micros(t0.elapsed()));
        check(&data, &back[..n]).map_err(|e| annotate(e, i))?;
        stats.bytes += n as u64;
    }
    Ok(())
}

fn annotate(e: io::Error, i: usize) -> io::Error {
    io::Error::new(e.kind(), format!("echo #{i}: {e}"))
}

fn main() {
    let args = Args::parse();
    let mut stats = Stats::default();
    let result = resolve(&args.addr).and_then(|addr| {
        if args.udp {
            run_udp(&args, addr, &mut stats)
        } else {
            run_tcp(&args, addr, &mut stats)
        }
    });
    let common = json!({
        "addr": args.addr,
        "proto": if args.udp { "udp" } else { "tcp" },
        "size": args.size,
        "count": args.count,
        "connections": stats.connect_us.len(),
        "echoes": stats.echo_us.len(),
        "bytes": stats.bytes,
        "connect_us_max": stats.connect_us.iter().max().copied().unwrap_or(0),
        "echo_us_max": stats.echo_us.iter().max().copied().unwrap_or(0),
        "connect_us_median": median(&mut stats.connect_us),
        "echo_us_median": median(&mut stats.echo_us),
    });
    let mut line = json!({ "ok": result.is_ok() });
    if let Err(e) = &result {
        line["error"] = json!(e.to_string());
    }
    if let (Some(line), Some(common)) = (line.as_object_mut(), common.as_object()) {
        line.extend(common.clone());
    }
    println!("{line}");
    if let Err(e) = result {
        eprintln!("{PROG}: error: {e}");
        std::process::exit(1);
    }
}
