//! libgcb.so pass-through: real programs under `LD_PRELOAD=libgcb.so`, with no broker and
//! no DPF server configured, must behave exactly as without it. Data is verified with
//! sha256 checksums. Everything runs on loopback with ports picked by binding port 0, so
//! the tests can run in parallel.
//!
//! The release library must already be built (`cargo build --release --workspace`); if it
//! (or the gcb-examples binaries) are missing, the tests FAIL with a clear message. The
//! library is found via `GCB_SHIM` (explicit path), `CARGO_TARGET_DIR`, the target dir of
//! this test executable, or `<repo>/target`.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// helpers

fn target_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        let p = PathBuf::from(t);
        v.push(if p.is_absolute() {
            p
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
        });
    }
    // <target>/<profile>/deps/passthrough-xxxx
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            v.push(t.to_path_buf());
        }
    }
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    v
}

fn release_artifact(name: &str) -> PathBuf {
    if name == "libgcb.so" {
        if let Ok(p) = std::env::var("GCB_SHIM") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "GCB_SHIM={} does not exist", p.display());
            return p;
        }
    }
    let dirs = target_dirs();
    for d in &dirs {
        let p = d.join("release").join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found in release/ of any of {dirs:?}: build it first with \
         `cargo build --release --workspace` (tests need the release libgcb.so and examples)"
    );
}

fn shim() -> PathBuf {
    release_artifact("libgcb.so")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "gcb-passthrough-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_file(path: &Path, len: usize) {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    std::fs::write(path, buf).unwrap();
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// A command with the shim preloaded (and the GCB env cleared unless set by the caller).
fn preloaded(prog: &str) -> Command {
    let mut c = Command::new(prog);
    c.env("LD_PRELOAD", shim())
        .env_remove("GCB_BROKER")
        .env_remove("GCB_DPF_SERVER")
        .env_remove("GCB_LOG")
        .env_remove("GCB_LOG_FILE");
    c
}

/// Kills the child on drop (servers).
struct Bg(Child, &'static str);
impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Bg {
    fn spawn(mut c: Command, what: &'static str) -> Bg {
        Bg(
            c.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}")),
            what,
        )
    }
    /// Wait for exit with a deadline; returns the output.
    fn finish(mut self, timeout: Duration) -> Output {
        let what = self.1;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(_st) = self.0.try_wait().unwrap() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let out = collect(&mut self.0);
                panic!(
                    "{what} did not finish within {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        collect(&mut self.0)
    }
}

fn collect(c: &mut Child) -> Output {
    let status = c.wait().unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = c.stdout.take() {
        o.read_to_end(&mut stdout).unwrap();
    }
    if let Some(mut e) = c.stderr.take() {
        e.read_to_end(&mut stderr).unwrap();
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Run to completion with a timeout; panics with stderr if it fails.
fn run_ok(mut c: Command, what: &'static str, timeout: Duration) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = Bg::spawn(c, what).finish(timeout);
    assert!(
        out.status.success(),
        "{what} failed ({}); stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Is something listening on 127.0.0.1:port (TCP)? Reads /proc so it never consumes a
/// connection of a single-shot server.
fn tcp_listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
            })
    })
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn iperf3_json(json: &[u8]) -> serde_json::Value {
    serde_json::from_slice(json).unwrap_or_else(|e| {
        panic!(
            "iperf3 JSON unreadable ({e}): {}",
            String::from_utf8_lossy(json)
        )
    })
}

const T: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// tests

#[test]
fn library_exports_the_hooks() {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(shim())
        .output()
        .expect("nm");
    assert!(out.status.success());
    let syms: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    for s in [
        "socket",
        "bind",
        "listen",
        "accept",
        "accept4",
        "connect",
        "getsockname",
        "getpeername",
        "getsockopt",
        "close",
        "close_range",
        "closefrom",
        "dup",
        "dup2",
        "dup3",
        "fcntl",
        "fcntl64",
        "select",
        "pselect",
        "poll",
        "ppoll",
        "__poll_chk",
        "__ppoll_chk",
        "epoll_ctl",
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "recv",
        "__recv_chk",
        "recvfrom",
        "__recvfrom_chk",
        "recvmsg",
        "send",
        "sendto",
        "sendmsg",
        "fork",
        "execve",
        "execv",
        "execvp",
        "execvpe",
    ] {
        assert!(syms.iter().any(|x| x == s), "libgcb.so does not export {s}");
    }
}

#[test]
fn curl_and_python_http_server() {
    let d = TempDir::new("http");
    random_file(&d.path("blob.bin"), 1 << 20);
    let port = free_port();
    let mut srv = preloaded("python3");
    srv.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(&d.0)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _srv = Bg::spawn(srv, "python3 -m http.server");
    wait_for("http.server", || tcp_listening(port));
    for i in 0..3 {
        let out = d.path(&format!("got{i}.bin"));
        let mut c = preloaded("curl");
        c.args(["-sS", "--fail", "-o"])
            .arg(&out)
            .arg(format!("http://127.0.0.1:{port}/blob.bin"));
        run_ok(c, "curl", T);
        assert_eq!(
            sha256(&out),
            sha256(&d.path("blob.bin")),
            "curl download {i}"
        );
    }
}

#[test]
fn ncat_one_mib_both_ways() {
    let d = TempDir::new("ncat");
    let (a, b) = (d.path("a.bin"), d.path("b.bin"));
    random_file(&a, 1 << 20);
    random_file(&b, 1 << 20);
    let port = free_port();
    let mut srv = preloaded("ncat");
    srv.args(["-l", "127.0.0.1", &port.to_string()])
        .stdin(std::fs::File::open(&a).unwrap())
        .stdout(std::fs::File::create(d.path("srv_got_b.bin")).unwrap())
        .stderr(Stdio::piped());
    let srv = Bg::spawn(srv, "ncat -l");
    wait_for("ncat listener", || tcp_listening(port));
    let mut cli = preloaded("ncat");
    cli.args(["127.0.0.1", &port.to_string()])
        .stdin(std::fs::File::open(&b).unwrap())
        .stdout(std::fs::File::create(d.path("cli_got_a.bin")).unwrap())
        .stderr(Stdio::piped());
    let out = Bg::spawn(cli, "ncat client").finish(T);
    assert!(
        out.status.success(),
        "ncat client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sout = srv.finish(T);
    assert!(
        sout.status.success(),
        "ncat server: {}",
        String::from_utf8_lossy(&sout.stderr)
    );
    assert_eq!(
        sha256(&d.path("cli_got_a.bin")),
        sha256(&a),
        "server -> client"
    );
    assert_eq!(
        sha256(&d.path("srv_got_b.bin")),
        sha256(&b),
        "client -> server"
    );
}

#[test]
fn socat_fork_mode_sequential_and_concurrent() {
    let d = TempDir::new("socat");
    let port = free_port();
    // Echo server: socat forks a child per connection, which execs cat.
    let mut srv = preloaded("socat");
    srv.arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
        .arg("EXEC:cat")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _srv = Bg::spawn(srv, "socat fork server");
    wait_for("socat listener", || tcp_listening(port));

    let client = |i: usize| -> Bg {
        let src = d.path(&format!("in{i}.bin"));
        random_file(&src, 256 * 1024);
        let mut c = preloaded("socat");
        c.args(["-t", "10", "-"])
            .arg(format!("TCP:127.0.0.1:{port}"))
            .stdin(std::fs::File::open(&src).unwrap())
            .stdout(std::fs::File::create(d.path(&format!("out{i}.bin"))).unwrap())
            .stderr(Stdio::piped());
        Bg::spawn(c, "socat client")
    };
    let check = |i: usize, out: Output| {
        assert!(
            out.status.success(),
            "socat client {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            sha256(&d.path(&format!("out{i}.bin"))),
            sha256(&d.path(&format!("in{i}.bin"))),
            "echo through socat fork server, client {i}"
        );
    };
    for i in 0..3 {
        let out = client(i).finish(T);
        check(i, out);
    }
    let concurrent: Vec<Bg> = (3..9).map(client).collect();
    for (i, c) in (3..9).zip(concurrent) {
        check(i, c.finish(T));
    }
}

fn iperf3(udp: bool) {
    let port = if udp { free_udp_port() } else { free_port() };
    let mut srv = preloaded("iperf3");
    srv.args(["-s", "-1", "-J", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let srv = Bg::spawn(srv, "iperf3 server");
    wait_for("iperf3 server", || tcp_listening(port));
    let mut cli = preloaded("iperf3");
    cli.args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "1", "-J"]);
    if udp {
        cli.args(["-u", "-b", "200M"]);
    }
    let out = run_ok(cli, "iperf3 client", T);
    let sout = srv.finish(T);
    assert!(sout.status.success(), "iperf3 server failed");
    for (who, json) in [("client", &out.stdout), ("server", &sout.stdout)] {
        let d = iperf3_json(json);
        assert_eq!(d.get("error"), None, "iperf3 {who} reported an error");
        // end.sum_received: what reached the server (iperf3's server-side `sum` reports 0
        // bytes for UDP even without the shim).
        let bytes = d["end"]["sum_received"]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("iperf3 {who}: no end.sum_received.bytes"));
        let proto = if udp { "udp" } else { "tcp" };
        assert!(
            bytes > 1_000_000,
            "iperf3 {who} ({proto}) moved only {bytes} bytes"
        );
        if udp {
            let packets = d["end"]["sum_received"]["packets"]
                .as_u64()
                .unwrap_or_else(|| panic!("iperf3 udp {who}: no end.sum_received.packets"));
            assert!(packets > 100, "iperf3 udp {who}: {packets} packets");
        }
    }
}

#[test]
fn iperf3_tcp() {
    iperf3(false);
}

#[test]
fn iperf3_udp() {
    iperf3(true);
}

#[test]
fn fork_and_exec_programs() {
    let d = TempDir::new("forkexec");
    let f = d.path("data.bin");
    random_file(&f, 1 << 20);
    let want = sha256(&f);
    // sh: fork + execve/execvp for a pipeline of three processes, all preloaded.
    let mut c = preloaded("sh");
    c.arg("-c")
        .arg("cat \"$1\" | cat | sha256sum | cut -c1-64")
        .arg("sh")
        .arg(&f);
    let out = run_ok(c, "sh pipeline", T);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);

    // python subprocess (vfork/fork + exec, close_range of fds in the child), then a
    // socket round trip in the parent and in a forked child, after exec'ing children.
    let script = include_str!("programs/pass_fork_exec.py");
    let mut c = preloaded("python3");
    c.arg("-c").arg(script).arg(&f);
    let out = run_ok(c, "python fork/exec", T);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![want.as_str(), want.as_str()],
        "python fork/exec output"
    );
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn python_echo_server(kind: &str, port: u16) -> Bg {
    let script = match kind {
        "threads" => {
            include_str!("programs/pass_echo_threads.py")
        }
        "asyncio" => {
            include_str!("programs/pass_echo_asyncio.py")
        }
        // Non-blocking single-threaded echo server on select() or poll().
        _ => {
            include_str!("programs/pass_echo_select_poll.py")
        }
    };
    let mut c = preloaded("python3");
    c.arg("-c").arg(script).arg(port.to_string()).arg(kind);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let bg = Bg::spawn(c, "python echo server");
    wait_for("python echo server", || tcp_listening(port));
    bg
}

fn mtclient(port: u16, threads: u32, conns: u32, size: u32) {
    let mut c = preloaded(release_artifact("gcb-mtclient").to_str().unwrap());
    c.arg(format!("127.0.0.1:{port}"))
        .arg(threads.to_string())
        .arg(conns.to_string())
        .arg(size.to_string());
    let out = run_ok(c, "gcb-mtclient", T);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("ok connections={}", threads * conns)),
        "gcb-mtclient: {text}"
    );
}

#[test]
fn multithreaded_client_against_threaded_server() {
    let port = free_port();
    let _srv = python_echo_server("threads", port);
    mtclient(port, 8, 25, 64 * 1024);
}

#[test]
fn epoll_server_asyncio() {
    let port = free_port();
    let _srv = python_echo_server("asyncio", port);
    mtclient(port, 4, 10, 128 * 1024);
}

#[test]
fn select_server() {
    let port = free_port();
    let _srv = python_echo_server("select", port);
    mtclient(port, 4, 10, 64 * 1024);
}

#[test]
fn poll_server() {
    let port = free_port();
    let _srv = python_echo_server("poll", port);
    mtclient(port, 4, 10, 64 * 1024);
}

const SOCKET_SCRIPT: &str = include_str!("programs/pass_socket_fork.py");

#[test]
fn silent_without_gcb_log() {
    let mut c = preloaded("python3");
    c.arg("-c").arg(SOCKET_SCRIPT);
    let out = run_ok(c, "python socket script", T);
    assert_eq!(out.stdout, b"done\n");
    assert!(
        out.stderr.is_empty(),
        "shim wrote to stderr without GCB_LOG: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Same with a broker configured: no layer yet, still pass-through; warns only if asked.
    let mut c = preloaded("python3");
    c.arg("-c")
        .arg(SOCKET_SCRIPT)
        .env("GCB_BROKER", "203.0.113.10:9618");
    let out = run_ok(c, "python socket script (GCB_BROKER)", T);
    assert_eq!(out.stdout, b"done\n");
    assert!(out.stderr.is_empty());
}

#[test]
fn debug_log_goes_to_stderr_never_stdout() {
    let mut c = preloaded("python3");
    c.arg("-c").arg(SOCKET_SCRIPT).env("GCB_LOG", "debug");
    let out = run_ok(c, "python socket script (GCB_LOG=debug)", T);
    assert_eq!(
        out.stdout, b"done\n",
        "stdout must be exactly the program's"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("libgcb["),
        "expected shim log lines on stderr, got: {err}"
    );
    for l in err.lines() {
        assert!(l.starts_with("libgcb["), "unexpected stderr line: {l}");
    }
    assert!(err.contains(": debug: listen("), "{err}");
    assert!(err.contains(": debug: fork"), "{err}");
}

/// The shim's own fd (here: the GCB_LOG_FILE fd) survives the program's close,
/// close_range and dup2 onto it, and the program sees exactly what it would without the
/// shim (EBADF for an fd it never opened; dup2 gives it the number it asked for).
#[test]
fn shim_fd_survives_program_close_range_and_dup2() {
    let d = TempDir::new("shimfd");
    let log = d.path("gcb.log");
    let script = include_str!("programs/pass_shim_fd.py");
    let mut c = preloaded("python3");
    c.arg("-c")
        .arg(script)
        .env("GCB_LOG", "debug")
        .env("GCB_LOG_FILE", &log);
    let out = run_ok(c, "python shim-fd script", T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "close EBADF\ndup2 True\nend\n"
    );
    assert!(
        out.stderr.is_empty(),
        "log must go to the file only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("split around 1 shim fd"), "log: {text}");
    assert!(text.contains("moved shim fd"), "log: {text}");
    // Logging still reaches the file after the move.
    let after = text.split("moved shim fd").nth(1).unwrap();
    assert!(after.contains(": debug: listen("), "log after move: {text}");
}
