//! TCP loopback ping-pong: N round trips of a small message between a client and an echo
//! thread in the same process, over plain std sockets (std's TcpStream uses libc
//! `send`/`recv`, so every round trip goes through four interposed calls when libgcb is
//! preloaded). Prints `ns_per_rtt=<float>` on stdout.
//!
//! Usage: gcb-pingpong [ROUNDS] [SIZE]   (defaults 100000, 32)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() -> std::io::Result<()> {
    const PROG: &str = "gcb-pingpong";
    const USAGE: &str = "usage: gcb-pingpong [ROUNDS] [SIZE]   (defaults 100000, 32)\n\
        TCP loopback ping-pong benchmark; prints ns_per_rtt=<float>.";
    let args = gcb_examples::positional_args(PROG, USAGE, 2);
    let rounds: usize = gcb_examples::number_arg(PROG, &args, 0, 100_000);
    let size: usize = gcb_examples::number_arg(PROG, &args, 1, 32);

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });

    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    // Warm-up (connection setup, first-touch, lazy symbol resolution).
    for _ in 0..1000 {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
    }
    let t0 = Instant::now();
    for _ in 0..rounds {
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
    }
    let ns = t0.elapsed().as_nanos() as f64 / rounds as f64;
    assert_eq!(back, msg);
    drop(c);
    server.join().expect("server thread")?;
    println!("ns_per_rtt={ns:.1}");
    Ok(())
}
