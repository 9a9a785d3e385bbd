//! A worker of the mini grid pool (as an HTCondor startd works), with plain sockets.
//!
//! Binds a listening socket (default 0.0.0.0:0), asks `getsockname()` for its address —
//! after listen(), as real daemons do; under GCB that is the broker's proxy address — and
//! advertises it to the collector (`ADVERTISE NAME IP:PORT`), again every `--interval`
//! seconds. If getsockname() reports the wildcard IP, it advertises the local IP of its
//! connection to the collector instead (HTCondor picks its own IP the same way).
//! Prints `advertising NAME IP:PORT` on stdout when the address is first accepted.
//!
//! Jobs: a connection sends `JOB N\n` and N bytes; the worker answers with the lowercase
//! hex SHA-256 of the bytes and its name, one per line. Several jobs may follow on one
//! connection.
//!
//! UDP status (as HTCondor daemons update their collector): from a UDP socket of its own
//! (bound to 0.0.0.0:0), the worker sends `STATUS NAME JOBS_DONE\n` to the collector's
//! address every `--status-interval` seconds and after each job, and waits up to
//! `--status-timeout` seconds for `ACK NAME\n` from that address. It logs (stderr) the
//! first ACK, a missing ACK (`no ACK from the collector ...`, once until ACKs resume) and
//! when ACKs resume.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gcb_examples::{die, hex, parse_secs, read_line, say};
use sha2::{Digest, Sha256};

const PROG: &str = "gcb-pool-worker";

/// Mini-pool worker: advertises its getsockname() address to the collector, runs jobs
/// (sha256 of the payload).
#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    /// The collector, IP:PORT.
    #[arg(long)]
    collector: SocketAddr,
    /// This worker's name (no whitespace).
    #[arg(long)]
    name: String,
    /// Address to listen on for jobs.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Seconds between advertisements.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    interval: Duration,
    /// Largest job payload accepted, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_job: u64,
    /// Seconds between UDP status updates to the collector (one also follows each job).
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    status_interval: Duration,
    /// Seconds to wait for the collector's ACK of a status update.
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    status_timeout: Duration,
}

/// Sends one status datagram and waits for its ACK from the collector's address.
fn send_status(sock: &UdpSocket, args: &Args, jobs: u64) -> io::Result<()> {
    sock.send_to(
        format!("STATUS {} {jobs}\n", args.name).as_bytes(),
        args.collector,
    )?;
    let want = format!("ACK {}\n", args.name);
    let deadline = Instant::now() + args.status_timeout;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            // An ACK of an earlier, late update is as good: it has the same content.
            Ok((n, from)) if from == args.collector && buf[..n] == *want.as_bytes() => {
                return Ok(())
            }
            Ok((n, from)) => eprintln!(
                "{PROG}: status socket: ignored {n} bytes from {from}: {:?}",
                String::from_utf8_lossy(&buf[..n.min(64)])
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends a status update every `--status-interval` and whenever `kick` fires (a job
/// finished), forever.
fn status_forever(args: &Args, jobs: &AtomicU64, kick: &mpsc::Receiver<()>) {
    let sock = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{PROG}: status socket: {e}; no UDP status updates");
            return;
        }
    };
    let mut acked_once = false;
    let mut failing = false;
    loop {
        let n = jobs.load(Ordering::SeqCst);
        match send_status(&sock, args, n) {
            Ok(()) => {
                if !acked_once {
                    eprintln!(
                        "{PROG}: collector {} acknowledged status ({n} jobs)",
                        args.collector
                    );
                    acked_once = true;
                }
                if failing {
                    eprintln!(
                        "{PROG}: collector {} acknowledges status again",
                        args.collector
                    );
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    eprintln!(
                        "{PROG}: no ACK from the collector {} for status ({n} jobs): {e}",
                        args.collector
                    );
                    failing = true;
                }
            }
        }
        match kick.recv_timeout(args.status_interval) {
            Ok(()) => while kick.try_recv().is_ok() {},
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Advertises once; returns the address advertised.
fn advertise(args: &Args, listen: SocketAddr) -> io::Result<SocketAddr> {
    let s = TcpStream::connect(args.collector)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut ad = listen;
    if ad.ip().is_unspecified() {
        ad.set_ip(s.local_addr()?.ip());
    }
    (&s).write_all(format!("ADVERTISE {} {ad}\n", args.name).as_bytes())?;
    let reply = read_line(&mut BufReader::new(&s), 512)?;
    if reply != "OK" {
        return Err(io::Error::other(format!("collector answered {reply:?}")));
    }
    Ok(ad)
}

fn advertise_forever(args: &Args, listen: SocketAddr) {
    let mut last: Option<SocketAddr> = None;
    let mut failing = false;
    loop {
        match advertise(args, listen) {
            Ok(ad) => {
                if last != Some(ad) {
                    say(PROG, format_args!("advertising {} {ad}", args.name));
                    last = Some(ad);
                }
                if failing {
                    eprintln!("{PROG}: collector {} reachable again", args.collector);
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    eprintln!("{PROG}: advertise to {}: {e}", args.collector);
                    failing = true;
                }
                // Retry soon while we have never been advertised.
                if last.is_none() {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        std::thread::sleep(args.interval);
    }
}

/// Jobs done so far, and the status thread's wake-up.
struct Done {
    jobs: Arc<AtomicU64>,
    kick: mpsc::Sender<()>,
}

/// Serves jobs on one connection until the client closes it.
fn serve(s: TcpStream, name: &str, max_job: u64, done: &Done) -> io::Result<u64> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::new(&s);
    let mut jobs = 0;
    loop {
        let line = match read_line(&mut r, 64) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(jobs),
            Err(e) => return Err(e),
        };
        let n: u64 = match line.strip_prefix("JOB ").map(str::parse) {
            Some(Ok(n)) if n <= max_job => n,
            _ => {
                (&s).write_all(b"ERROR bad job\n")?;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad job line {line:?}"),
                ));
            }
        };
        let mut hasher = Sha256::new();
        let mut left = n;
        while left > 0 {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("job payload cut short: {} of {n} bytes", n - left),
                ));
            }
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            hasher.update(&buf[..take]);
            r.consume(take);
            left -= take as u64;
        }
        (&s).write_all(format!("{}\n{name}\n", hex(&hasher.finalize())).as_bytes())?;
        jobs += 1;
        done.jobs.fetch_add(1, Ordering::SeqCst);
        let _ = done.kick.send(());
    }
}

fn main() {
    let args = Args::parse();
    if args.name.is_empty() || args.name.chars().any(char::is_whitespace) {
        die(PROG, "--name must be non-empty without whitespace");
    }
    // std binds and listens in one call, so getsockname() comes after listen().
    let listener = TcpListener::bind(args.bind)
        .unwrap_or_else(|e| die(PROG, format!("bind {}: {e}", args.bind)));
    let listen = listener
        .local_addr()
        .unwrap_or_else(|e| die(PROG, format!("getsockname: {e}")));
    let name = args.name.clone();
    let max_job = args.max_job;
    let jobs = Arc::new(AtomicU64::new(0));
    let (kick, kicked) = mpsc::channel();
    let args = Arc::new(args);
    {
        let args = Arc::clone(&args);
        let jobs = Arc::clone(&jobs);
        std::thread::spawn(move || status_forever(&args, &jobs, &kicked));
    }
    std::thread::spawn(move || advertise_forever(&args, listen));
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                let name = name.clone();
                let done = Done {
                    jobs: Arc::clone(&jobs),
                    kick: kick.clone(),
                };
                std::thread::spawn(move || {
                    if let Err(e) = serve(s, &name, max_job, &done) {
                        eprintln!("{PROG}: job connection from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("{PROG}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
