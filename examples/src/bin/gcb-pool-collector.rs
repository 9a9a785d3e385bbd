//! The collector of a mini grid pool (as HTCondor's collector works), with plain sockets.
//!
//! Protocol, one request per TCP connection:
//! * `ADVERTISE NAME IP:PORT\n` — a worker advertises (or re-advertises) itself; the
//!   collector answers `OK\n`. An ad not renewed within `--expire` seconds is dropped.
//! * `QUERY\n` — the collector answers with every ad, one `NAME IP:PORT` per line, then
//!   closes the connection.
//! * `STATUS?\n` — the collector answers with the last UDP status of every worker, one
//!   `NAME JOBS_DONE FROM_IP:PORT AGE_MS` per line (FROM: the datagram's sender as
//!   recvfrom() reported it), then closes the connection.
//!
//! UDP status updates (as HTCondor daemons send theirs): a UDP socket bound to the same
//! `--bind` address takes `STATUS NAME JOBS_DONE\n` datagrams, records them and answers
//! each with `ACK NAME\n` to its sender; anything else is answered `ERROR ...\n`.
//!
//! Prints `listening on <getsockname() address>` on stdout when ready (the TCP socket's),
//! and `udp status on <address>` on stderr (the UDP socket's getsockname()).

use std::collections::BTreeMap;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use gcb_examples::{die, parse_secs, read_line, say};

const PROG: &str = "gcb-pool-collector";

/// Mini-pool collector: stores worker ads (`ADVERTISE NAME IP:PORT`), answers `QUERY`;
/// records UDP status updates (`STATUS NAME JOBS_DONE`), answers `STATUS?`.
#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    bind: SocketAddr,
    /// Seconds after which an ad that was not renewed is dropped.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    expire: Duration,
}

type Ads = Arc<Mutex<BTreeMap<String, (String, Instant)>>>;

/// Last UDP status per worker: (jobs done, sender address, when).
type Statuses = Arc<Mutex<BTreeMap<String, (u64, SocketAddr, Instant)>>>;

/// Parses a `STATUS NAME JOBS_DONE\n` datagram.
fn parse_status(datagram: &[u8]) -> Option<(&str, u64)> {
    let text = std::str::from_utf8(datagram).ok()?.strip_suffix('\n')?;
    let mut words = text.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("STATUS"), Some(name), Some(jobs), None) if !name.is_empty() => {
            Some((name, jobs.parse().ok()?))
        }
        _ => None,
    }
}

/// Serves UDP status updates forever.
fn serve_status(sock: UdpSocket, statuses: &Statuses) {
    let mut buf = vec![0u8; 2048];
    let mut known = std::collections::BTreeSet::new();
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{PROG}: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let reply = match parse_status(&buf[..n]) {
            Some((name, jobs)) => {
                let mut st = statuses.lock().unwrap_or_else(|p| p.into_inner());
                st.insert(name.to_owned(), (jobs, peer, Instant::now()));
                drop(st);
                if known.insert((name.to_owned(), peer)) {
                    eprintln!("{PROG}: {peer}: first status from {name} ({jobs} jobs)");
                }
                format!("ACK {name}\n")
            }
            None => {
                eprintln!("{PROG}: {peer}: bad status datagram ({n} bytes)");
                "ERROR bad status\n".to_owned()
            }
        };
        if let Err(e) = sock.send_to(reply.as_bytes(), peer) {
            eprintln!("{PROG}: udp send to {peer}: {e}");
        }
    }
}

fn handle(s: TcpStream, ads: &Ads, statuses: &Statuses, expire: Duration) -> io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(&s);
    let line = read_line(&mut r, 512)?;
    let mut words = line.split_whitespace();
    let mut w = &s;
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("ADVERTISE"), Some(name), Some(addr), None) => {
            if addr.parse::<SocketAddr>().is_err() {
                w.write_all(b"ERROR bad address\n")?;
                return Ok(format!("bad ad {line:?}"));
            }
            let mut ads = ads.lock().unwrap_or_else(|p| p.into_inner());
            let old = ads.insert(name.to_owned(), (addr.to_owned(), Instant::now()));
            drop(ads);
            w.write_all(b"OK\n")?;
            Ok(match old {
                Some((a, _)) if a == addr => String::new(),
                _ => format!("ad {name} {addr}"),
            })
        }
        (Some("QUERY"), None, None, None) => {
            let mut out = String::new();
            {
                let mut ads = ads.lock().unwrap_or_else(|p| p.into_inner());
                ads.retain(|_, (_, seen)| seen.elapsed() < expire);
                for (name, (addr, _)) in ads.iter() {
                    out.push_str(&format!("{name} {addr}\n"));
                }
            }
            w.write_all(out.as_bytes())?;
            Ok(String::new())
        }
        (Some("STATUS?"), None, None, None) => {
            let mut out = String::new();
            {
                let st = statuses.lock().unwrap_or_else(|p| p.into_inner());
                for (name, (jobs, from, when)) in st.iter() {
                    let age = when.elapsed().as_millis();
                    out.push_str(&format!("{name} {jobs} {from} {age}\n"));
                }
            }
            w.write_all(out.as_bytes())?;
            Ok(String::new())
        }
        _ => {
            w.write_all(b"ERROR unknown request\n")?;
            Ok(format!("bad request {line:?}"))
        }
    }
}

fn main() {
    let args = Args::parse();
    let listener = TcpListener::bind(args.bind)
        .unwrap_or_else(|e| die(PROG, format!("bind {}: {e}", args.bind)));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| die(PROG, format!("getsockname: {e}")));
    // The UDP status socket on the same --bind address (with port 0 it gets a port of
    // its own; getsockname() cannot tell the real TCP port under GCB, so none is derived).
    let udp_bind = args.bind;
    let udp = UdpSocket::bind(udp_bind)
        .unwrap_or_else(|e| die(PROG, format!("bind udp {udp_bind}: {e}")));
    let udp_addr = udp
        .local_addr()
        .unwrap_or_else(|e| die(PROG, format!("getsockname (udp): {e}")));
    eprintln!("{PROG}: udp status on {udp_addr}");
    let statuses: Statuses = Arc::default();
    {
        let statuses = Arc::clone(&statuses);
        std::thread::spawn(move || serve_status(udp, &statuses));
    }
    say(PROG, format_args!("listening on {addr}"));
    let ads: Ads = Arc::default();
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                let ads = Arc::clone(&ads);
                let statuses = Arc::clone(&statuses);
                let expire = args.expire;
                std::thread::spawn(move || match handle(s, &ads, &statuses, expire) {
                    Ok(note) if note.is_empty() => {}
                    Ok(note) => eprintln!("{PROG}: {peer}: {note}"),
                    Err(e) => eprintln!("{PROG}: {peer}: {e}"),
                });
            }
            Err(e) => {
                eprintln!("{PROG}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
