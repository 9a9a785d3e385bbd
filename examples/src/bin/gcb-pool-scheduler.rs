//! The scheduler of the mini grid pool (as an HTCondor schedd works), with plain sockets.
//!
//! Queries the collector (`QUERY`), then connects to EVERY advertised worker (all workers
//! in parallel) and runs JOBS jobs on each, one connection per job: `JOB N\n` + N random
//! bytes, and checks the answer (the sha256 of the bytes and the worker's advertised
//! name). Prints one JSON line:
//! `{"ok":..,"workers":[{"name":..,"addr":..,"jobs_ok":..,"jobs_failed":..,"errors":[..]}],"jobs_ok":..,"jobs_failed":..}`
//! and exits 1 if any job failed, any worker was unreachable, or fewer than
//! `--min-workers` workers were advertised within `--wait` seconds.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use gcb_examples::{parse_secs, random_bytes, read_line, sha256_hex};
use serde_json::json;

const PROG: &str = "gcb-pool-scheduler";

/// Mini-pool scheduler: runs jobs on every worker the collector knows and verifies them.
#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    /// The collector, IP:PORT.
    #[arg(long)]
    collector: SocketAddr,
    /// Jobs per worker.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
    /// Payload bytes per job.
    #[arg(long, default_value_t = 65536)]
    size: usize,
    /// Wait (up to `--wait`) until the collector has at least this many workers.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Seconds to wait for `--min-workers`.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    wait: Duration,
    /// Read/write timeout of every connection, in seconds.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    timeout: Duration,
}

struct Ad {
    name: String,
    addr: String,
}

fn query(args: &Args) -> io::Result<Vec<Ad>> {
    let mut s = TcpStream::connect(args.collector)
        .map_err(|e| io::Error::new(e.kind(), format!("collector {}: {e}", args.collector)))?;
    s.set_read_timeout(Some(args.timeout))?;
    s.set_write_timeout(Some(args.timeout))?;
    s.write_all(b"QUERY\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [name, addr] => Ok(Ad {
                    name: name.to_owned(),
                    addr: addr.to_owned(),
                }),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("collector sent a bad ad {line:?}"),
                )),
            },
        )
        .collect()
}

fn query_until_enough(args: &Args) -> io::Result<Vec<Ad>> {
    let deadline = Instant::now() + args.wait;
    loop {
        let result = query(args);
        match &result {
            Ok(ads) if ads.len() >= args.min_workers => return result,
            _ if Instant::now() >= deadline => return result,
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Runs one job on `ad`: sends the payload and checks hash and name.
fn job(args: &Args, ad: &Ad) -> io::Result<()> {
    let data = random_bytes(args.size)?;
    let s = TcpStream::connect(ad.addr.as_str())
        .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", ad.addr)))?;
    s.set_read_timeout(Some(args.timeout))?;
    s.set_write_timeout(Some(args.timeout))?;
    (&s).write_all(format!("JOB {}\n", data.len()).as_bytes())?;
    (&s).write_all(&data)?;
    let mut r = BufReader::new(&s);
    let hash = read_line(&mut r, 128)?;
    let name = read_line(&mut r, 512)?;
    let want = sha256_hex(&data);
    if hash != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("wrong hash {hash:?}, want {want}"),
        ));
    }
    if name != ad.name {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answered by {name:?}, not {:?}", ad.name),
        ));
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let ads = match query_until_enough(&args) {
        Ok(ads) => ads,
        Err(e) => {
            println!("{}", json!({"ok": false, "error": format!("query: {e}")}));
            eprintln!("{PROG}: error: query {}: {e}", args.collector);
            std::process::exit(1);
        }
    };
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = ads
            .iter()
            .map(|ad| {
                let args = &args;
                scope.spawn(move || {
                    let mut ok = 0;
                    let mut errors = Vec::new();
                    for i in 0..args.jobs {
                        match job(args, ad) {
                            Ok(()) => ok += 1,
                            Err(e) => errors.push(format!("job #{i}: {e}")),
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (0, vec!["worker thread panicked".to_owned()]))
            })
            .collect()
    });
    let jobs_ok: usize = results.iter().map(|(ok, _)| ok).sum();
    let jobs_failed = ads.len() * args.jobs - jobs_ok;
    let mut problems = Vec::new();
    if ads.len() < args.min_workers {
        problems.push(format!(
            "{} workers advertised, want at least {}",
            ads.len(),
            args.min_workers
        ));
    }
    let workers: Vec<_> = ads
        .iter()
        .zip(&results)
        .map(|(ad, (ok, errors))| {
            if !errors.is_empty() {
                problems.push(format!("{} ({}): {}", ad.name, ad.addr, errors[0]));
            }
            json!({
                "name": ad.name,
                "addr": ad.addr,
                "jobs_ok": ok,
                "jobs_failed": args.jobs - ok,
                "errors": errors,
            })
        })
        .collect();
    let ok = problems.is_empty();
    println!(
        "{}",
        json!({
            "ok": ok,
            "collector": args.collector.to_string(),
            "workers": workers,
            "jobs_ok": jobs_ok,
            "jobs_failed": jobs_failed,
        })
    );
    if !ok {
        for p in &problems {
            eprintln!("{PROG}: error: {p}");
        }
        std::process::exit(1);
    }
}
