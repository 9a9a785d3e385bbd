//! The echo server of the paper's test suite (section 5), with plain sockets.
//!
//! Binds, listens, and prints ONE line on stdout: `listening on <getsockname() address>`,
//! the address it would advertise (under GCB that is the broker's proxy address). Then it
//! echoes every TCP connection back (one thread per connection) until killed. With
//! `--udp` it echoes every datagram back to its sender instead.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};

use clap::Parser;
use gcb_examples::{die, say};

const PROG: &str = "gcb-echo-server";

/// Echo server: prints `listening on ADDR` (from getsockname()), then echoes everything.
#[derive(Parser, Debug)]
#[command(name = PROG, version = gcb_examples::VERSION)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Echo UDP datagrams instead of TCP connections.
    #[arg(long)]
    udp: bool,
}

fn announce(addr: io::Result<SocketAddr>) {
    let addr = addr.unwrap_or_else(|e| die(PROG, format!("getsockname: {e}")));
    say(PROG, format_args!("listening on {addr}"));
}

fn echo(mut s: TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn serve_tcp(bind: SocketAddr) -> ! {
    // std binds and listens in one call; getsockname() after listen(), as real daemons do.
    let listener =
        TcpListener::bind(bind).unwrap_or_else(|e| die(PROG, format!("bind {bind}: {e}")));
    announce(listener.local_addr());
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                std::thread::spawn(move || {
                    if let Err(e) = echo(s) {
                        eprintln!("{PROG}: connection from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("{PROG}: accept: {e}");
                // EMFILE and friends: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn serve_udp(bind: SocketAddr) -> ! {
    let sock = UdpSocket::bind(bind).unwrap_or_else(|e| die(PROG, format!("bind {bind}: {e}")));
    announce(sock.local_addr());
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = sock.send_to(&buf[..n], peer) {
                    eprintln!("{PROG}: send to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("{PROG}: recv: {e}"),
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.udp {
        serve_udp(args.bind)
    } else {
        serve_tcp(args.bind)
    }
}
