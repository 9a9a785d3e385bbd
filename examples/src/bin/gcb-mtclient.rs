//! Multithreaded echo client: THREADS threads each make CONNS sequential connections to
//! HOST:PORT, send SIZE bytes of per-connection pseudo-random data, half-close, read the
//! echo to EOF and check it byte for byte. Exits non-zero on any mismatch or error; prints
//! `ok connections=<n> bytes=<n>` on success.
//!
//! Usage: gcb-mtclient HOST:PORT [THREADS] [CONNS] [SIZE]   (defaults 8, 16, 65536)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn payload(seed: u64, size: usize) -> Vec<u8> {
    // xorshift64*: deterministic, different per connection.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn one(addr: &str, seed: u64, size: usize) -> std::io::Result<()> {
    let data = payload(seed, size);
    let mut s = TcpStream::connect(addr)?;
    let mut r = s.try_clone()?;
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut got = Vec::new();
        r.read_to_end(&mut got)?;
        Ok(got)
    });
    s.write_all(&data)?;
    s.shutdown(Shutdown::Write)?;
    let got = reader.join().expect("reader thread")?;
    if got != data {
        return Err(std::io::Error::other(format!(
            "echo mismatch on connection {seed}: sent {} bytes, got {}",
            data.len(),
            got.len()
        )));
    }
    Ok(())
}

fn main() {
    const PROG: &str = "gcb-mtclient";
    const USAGE: &str =
        "usage: gcb-mtclient HOST:PORT [THREADS] [CONNS] [SIZE]   (defaults 8, 16, 65536)\n\
        Multithreaded echo client: each thread makes CONNS connections to HOST:PORT, sends SIZE\n\
        bytes, reads the echo and checks it; prints `ok connections=N bytes=N`.";
    let args = gcb_examples::positional_args(PROG, USAGE, 4);
    let Some(addr) = args.first().cloned() else {
        eprintln!("{PROG}: error: HOST:PORT missing\n{USAGE}");
        std::process::exit(2)
    };
    let threads: usize = gcb_examples::number_arg(PROG, &args, 1, 8);
    let conns: usize = gcb_examples::number_arg(PROG, &args, 2, 16);
    let size: usize = gcb_examples::number_arg(PROG, &args, 3, 65536);
    let done = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let addr = addr.clone();
            let done = done.clone();
            std::thread::spawn(move || -> Result<(), String> {
                for c in 0..conns {
                    let seed = (t * conns + c) as u64 + 1;
                    one(&addr, seed, size).map_err(|e| format!("thread {t} conn {c}: {e}"))?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut failed = false;
    for h in handles {
        if let Err(e) = h.join().expect("client thread") {
            eprintln!("gcb-mtclient: {e}");
            failed = true;
        }
    }
    let n = done.load(Ordering::Relaxed);
    if failed || n != threads * conns {
        eprintln!("gcb-mtclient: {n} of {} connections ok", threads * conns);
        std::process::exit(1);
    }
    println!("ok connections={n} bytes={}", n * size);
}
