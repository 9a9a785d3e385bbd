//! Test harness: runs the real `gcb-brokerd` binary and talks to it with
//! gcb-proto's `Endpoint` over a real UDP socket.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gcb_proto::{Body, Config, Endpoint, Event, Now, PoolKey, RequestId};

pub fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    }
}

/// A running broker; killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    lines: Receiver<String>,
}

impl Broker {
    /// Starts `gcb-brokerd --listen <listen> <extra...>` and waits for the
    /// startup line.
    /// Keyed with [`TEST_KEY`] (as a deployment is), unless `extra` has `--key-file` or
    /// `--insecure`. Without `--drain-grace-secs` in `extra`, with 0: [`Broker::stop`]
    /// stops at once, relays open or not.
    pub fn start(listen: &str, extra: &[&str]) -> Broker {
        let no_drain = (!extra.iter().any(|a| a.starts_with("--drain-grace-secs")))
            .then_some(["--drain-grace-secs", "0"]);
        let own = extra
            .iter()
            .any(|a| a.starts_with("--key-file") || *a == "--insecure");
        let default_key = (!own).then(|| ["--key-file".to_owned(), test_key_file()]);
        // Brokers of parallel tests must not share the default admin socket path.
        let no_admin = (!extra.iter().any(|a| a.starts_with("--admin-socket")))
            .then(|| ["--admin-socket".to_owned(), "none".to_owned()]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_gcb-brokerd"))
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .args(default_key.iter().flatten())
            .args(no_admin.iter().flatten())
            .args(no_drain.iter().flatten())
            .env_remove("GCB_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gcb-brokerd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[broker] {line}");
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("broker did not print its startup line");
            // After the timestamp (or journal priority) that starts every line.
            if let Some((_, rest)) = line.split_once("gcb-brokerd: INFO listening on udp ") {
                let (udp, tcp) = rest
                    .split_once(", relay tcp ")
                    .expect("startup line format");
                assert_eq!(udp, tcp);
                break udp.parse().unwrap();
            }
        };
        Broker {
            child: Some(child),
            addr,
            log,
            lines: rx,
        }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no broker log line containing {needle:?}"),
            }
        }
    }

    /// SIGTERM, wait for a clean exit, return the full log.
    pub fn stop(mut self) -> Vec<String> {
        let mut child = self.child.take().unwrap();
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "broker did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "broker exit status {status}");
        // Let the reader thread drain the pipe.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            if self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(" stats "))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log.lock().unwrap().clone()
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Extracts `name=N` from the last stats line of a log.
pub fn stat(log: &[String], name: &str) -> u64 {
    let line = log
        .iter()
        .rev()
        .find(|l| l.contains(" stats "))
        .expect("no stats line");
    let key = format!(" {name}=");
    let i = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + key.len();
    line[i..].split(' ').next().unwrap().parse().unwrap()
}

/// A GCB control client over a real UDP socket.
pub struct Client {
    pub sock: UdpSocket,
    pub ep: Endpoint,
    pub broker: SocketAddr,
    /// Requests the broker sent us (already acked).
    pub inbox: VecDeque<Body>,
    responses: HashMap<RequestId, Option<Body>>,
}

/// The pool key of the brokers [`Broker::start`] starts by default.
pub const TEST_KEY: &[u8] = b"a-pool-key-for-the-broker-tests\n";

pub fn test_key() -> PoolKey {
    PoolKey::from_file_contents(TEST_KEY).unwrap()
}

/// A file holding [`TEST_KEY`] (written once per test process).
pub fn test_key_file() -> String {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("gcb-brokerd-tests-{}.key", std::process::id()));
        std::fs::write(&p, TEST_KEY).unwrap();
        p.to_string_lossy().into_owned()
    })
    .clone()
}

impl Client {
    /// A client keyed with [`TEST_KEY`].
    pub fn new(broker: SocketAddr) -> Client {
        Client::bind("127.0.0.1:0", broker, Some(TEST_KEY))
    }

    pub fn bind(local: &str, broker: SocketAddr, key: Option<&[u8]>) -> Client {
        let sock = UdpSocket::bind(local).unwrap();
        let key = key.map(|k| PoolKey::from_file_contents(k).unwrap());
        let session = now().unix_ms ^ u64::from(sock.local_addr().unwrap().port()) << 48;
        Client {
            sock,
            ep: Endpoint::new(Config::default(), key, session),
            broker,
            inbox: VecDeque::new(),
            responses: HashMap::new(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// One round: send, wait for a datagram until `until` at most, process.
    fn step(&mut self, until: Instant) {
        while let Some(t) = self.ep.poll_transmit() {
            let _ = self.sock.send_to(&t.payload, t.to);
        }
        let mut wake = until;
        if let Some(t) = self.ep.poll_timeout() {
            wake = wake.min(t);
        }
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            self.ep.handle_datagram(now(), from, &buf[..n]);
        }
        self.ep.handle_timeout(now());
        while let Some(ev) = self.ep.poll_event() {
            match ev {
                Event::Request { from, id, body } => {
                    self.ep.respond(now(), from, id, Body::Ack {}).unwrap();
                    self.inbox.push_back(body);
                }
                Event::Response { request, body, .. } => {
                    self.responses.insert(request, Some(body));
                }
                Event::Timeout { request, .. } => {
                    self.responses.insert(request, None);
                }
            }
        }
        while let Some(t) = self.ep.poll_transmit() {
            let _ = self.sock.send_to(&t.payload, t.to);
        }
    }

    /// Sends a request and waits for its response (None: timed out).
    pub fn request(&mut self, body: Body) -> Option<Body> {
        let id = self.ep.send_request(now(), self.broker, body).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(r) = self.responses.remove(&id) {
                return r;
            }
            assert!(Instant::now() < deadline, "endpoint never reported");
            self.step(Instant::now() + Duration::from_millis(50));
        }
    }

    /// Waits for a broker request matching `pred`.
    pub fn wait_request(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Body) -> bool,
    ) -> Option<Body> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.inbox.iter().position(&pred) {
                return self.inbox.remove(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.step(deadline.min(Instant::now() + Duration::from_millis(50)));
        }
    }

    /// Keeps the endpoint running (acks, retransmits) for `d`.
    pub fn idle(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            self.step(deadline);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// The preamble for a connect id given as 32 hex chars: its presentation under
/// [`TEST_KEY`] (see gcb_proto::token).
pub fn preamble(id: &str) -> Vec<u8> {
    let raw = gcb_proto::token::from_hex(id).expect("a 32-hex connect id");
    let p = gcb_proto::token::present_hex(Some(&test_key()), gcb_proto::token::Use::Connect, &raw);
    format!("GCB-CONNECT {p}\n").into_bytes()
}

/// Connects to `addr` and sends the preamble.
pub fn dial_with_id(addr: SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&preamble(id)).unwrap();
    s
}

/// Reads until EOF with a timeout per read.
pub fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}
