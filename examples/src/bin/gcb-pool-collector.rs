//! The collector of a mini grid pool (as HTCondor's collector works), with plain sockets.
//!
//! Protocol, one request per TCP connection:
//! * `ADVERTISE NAME IP:PORT\n` — a worker advertises (or re-advertises) itself; the
//!   collector answers `OK\n`. An ad not renewed within `--expire` seconds is dropped.
//! * `QUERY\n` — the collector answers with every ad, one `NAME IP:PORT` per line, then
//!   closes the connection.
//!
//! Prints `listening on <getsockname() address>` on stdout when ready.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use gcb_examples::{die, parse_secs, read_line, say};

const PROG: &str = "gcb-pool-collector";

/// Mini-pool collector: stores worker ads (`ADVERTISE NAME IP:PORT`), answers `QUERY`.
#[derive(Parser, Debug)]
#[command(name = PROG, version)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    bind: SocketAddr,
    /// Seconds after which an ad that was not renewed is dropped.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    expire: Duration,
}

type Ads = Arc<Mutex<BTreeMap<String, (String, Instant)>>>;

fn handle(s: TcpStream, ads: &Ads, expire: Duration) -> io::Result<String> {
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
    say(PROG, format_args!("listening on {addr}"));
    let ads: Ads = Arc::default();
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                let ads = Arc::clone(&ads);
                let expire = args.expire;
                std::thread::spawn(move || match handle(s, &ads, expire) {
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
