//! Loud, clear failures on the client side (issue #13, items 7 and 8), in the lab.
//!
//! * `each_misconfiguration_says_one_line`: every misconfiguration (bogus or IPv6 broker
//!   address, missing, short or group/other-readable key file, unreachable broker, a bad
//!   `GCB_LOG`, a config file with an unknown key) gives exactly one `gcb: ...` line on
//!   stderr naming what is wrong, the program still runs (locally) and its stdout is exactly
//!   its own; a forked child and an exec'd image do not repeat the line; `GCB_LOG=off`
//!   and `gcb-run -q` silence it; the environment overrides the config file.
//! * `broker_lost_and_refused_are_said_once`: a broker that stops answering heartbeats,
//!   and a broker refusing a registration (quota), each give one line.
//! * `check_probes_the_daemons`: `gcb-run --check` against a running broker and portfwd
//!   (exit 0, both "answering"), against nothing (exit 1), with the wrong key (exit 1).
//! * `gcb_run_rejects_bad_options`: bad options are refused before the program runs.
//! * `static_and_go_programs_are_warned`: one warning line, and the program still runs.
//! * `every_binary_has_help_and_version`: `--help` and `--version` exit 0; the version
//!   names a commit of this repository; gcb-mtclient/gcb-pingpong do not connect or bench.
//! * `small_fixes`: gcb-dpf-request names the address nothing answered at, within seconds;
//!   out-of-range ports have their own message; `--log trace` accepted by the daemons.
//!
//! Nothing is built here (`scripts/test-all` builds the workspace first). Needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gcb_lab::{
    artifact, brokerd, gcb_run, gcb_run_script, libgcb, read_text, repo_root, wait_line, Broker,
    Host, Lab, Portfwd, Scratch,
};

const P1: &str = "203.0.113.10";
/// An address in the lab's public segment where nothing runs.
const NOBODY: &str = "203.0.113.99";
const RUN: Duration = Duration::from_secs(60);

/// Listens on 0.0.0.0:PORT (registering with a broker if one is configured), forks a
/// child that does the same on PORT+1, and each echoes one local connection; prints
/// `child ok` then `ok`.
const ECHO_TWICE: &str = r#"
import os, socket, sys
def once(port):
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port)); ls.listen(4)
    c = socket.create_connection(("127.0.0.1", port)); s, _ = ls.accept()
    c.sendall(b"ping"); assert s.recv(4) == b"ping"
    s.close(); c.close(); ls.close()
port = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    once(port + 1); print("child ok", flush=True); os._exit(0)
os.waitpid(pid, 0)
once(port)
print("ok", flush=True)
"#;

const WANT_STDOUT: &str = "child ok\nok\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn finish(lab: &Lab, cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    lab.spawn(cmd).expect("spawn").finish(RUN)
}

/// Runs ECHO_TWICE on `port` in a1 through gcb-run with `opts` and `env`; asserts it ran
/// to the end with its own stdout, and returns its stderr lines.
fn echo_twice(lab: &Lab, opts: &[&str], env: &[(&str, &str)], port: u16) -> Vec<String> {
    let mut c = gcb_run(lab, Host::A1, true, opts, None);
    c.args(["python3", "-c", ECHO_TWICE, &port.to_string()]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = finish(lab, &mut c);
    assert!(
        out.status.success() && text(&out.stdout) == WANT_STDOUT,
        "{opts:?} {env:?}: status {:?}, stdout {:?} (want {WANT_STDOUT:?}), stderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr).lines().map(str::to_owned).collect()
}

/// Exactly one stderr line, starting `gcb: LEVEL:` and containing every `needle`.
fn one_line(what: &str, lines: &[String], level: &str, needles: &[&str]) {
    assert_eq!(
        lines.len(),
        1,
        "{what}: want exactly one line, got {lines:#?}"
    );
    let l = &lines[0];
    assert!(
        l.starts_with(&format!("gcb: {level}: ")) && needles.iter().all(|n| l.contains(n)),
        "{what}: {l:?} should start with 'gcb: {level}:' and name {needles:?}"
    );
}

fn write(path: &Path, contents: &str, mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn each_misconfiguration_says_one_line() {
    brokerd();
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("clienterr", &lab);
    let broker = Broker::start(&lab, Host::P1, P1, true, &[], &dir.join("broker.log"));
    let mut port = 18000;
    let mut next = || {
        port += 2;
        port
    };

    // An unreachable broker: listen() waits, then serves locally; said once (the forked
    // child's listen does not repeat it).
    let l = echo_twice(&lab, &["--broker", NOBODY], &[], next());
    one_line(
        "unreachable broker",
        &l,
        "warning",
        &[
            &format!("broker {NOBODY}:9650"),
            "serving locally only (plain socket)",
        ],
    );
    // Silenced by GCB_LOG=off and by gcb-run -q.
    let l = echo_twice(&lab, &["--broker", NOBODY], &[("GCB_LOG", "off")], next());
    assert!(l.is_empty(), "GCB_LOG=off: {l:#?}");
    let l = echo_twice(&lab, &["-q", "--broker", NOBODY], &[], next());
    assert!(l.is_empty(), "gcb-run -q: {l:#?}");

    // Bad addresses given in the environment (gcb-run's flags refuse them earlier).
    let l = echo_twice(&lab, &[], &[("GCB_BROKER", "bogus")], next());
    one_line(
        "bogus broker",
        &l,
        "error",
        &["GCB_BROKER", "\"bogus\"", "plain sockets"],
    );
    let l = echo_twice(&lab, &[], &[("GCB_BROKER", "[::1]:41203")], next());
    one_line(
        "IPv6 broker",
        &l,
        "error",
        &["IPv6 brokers are not supported"],
    );
    let l = echo_twice(&lab, &[], &[("GCB_DPF_SERVER", "10.1.0.1:99999")], next());
    one_line("dpf port", &l, "error", &["GCB_DPF_SERVER", "out of range"]);
    // Through a shell: the exec'd python does not repeat what sh said.
    let mut c = gcb_run(&lab, Host::A1, true, &[], None);
    c.args(["sh", "-c", "python3 -c \"$0\" 18100", ECHO_TWICE])
        .env("GCB_BROKER", "bogus");
    let out = finish(&lab, &mut c);
    assert_eq!(text(&out.stdout), WANT_STDOUT, "{}", text(&out.stderr));
    let l: Vec<String> = text(&out.stderr).lines().map(str::to_owned).collect();
    one_line("bogus broker through sh", &l, "error", &["\"bogus\""]);

    // Key files: missing, too short, readable by others.
    let p1 = ["--broker", P1];
    let missing = dir.join("missing.key");
    let l = echo_twice(
        &lab,
        &p1,
        &[("GCB_KEY_FILE", missing.to_str().unwrap())],
        next(),
    );
    one_line(
        "missing key",
        &l,
        "error",
        &[missing.to_str().unwrap(), "No such file", "plain sockets"],
    );
    let short = dir.join("short.key");
    write(&short, "tooshort\n", 0o600);
    let l = echo_twice(
        &lab,
        &p1,
        &[("GCB_KEY_FILE", short.to_str().unwrap())],
        next(),
    );
    one_line("short key", &l, "error", &["short.key", "at least 16"]);
    let loose = dir.join("loose.key");
    write(&loose, &fs::read_to_string(lab.key_file()).unwrap(), 0o644);
    let l = echo_twice(
        &lab,
        &p1,
        &[("GCB_KEY_FILE", loose.to_str().unwrap())],
        next(),
    );
    one_line(
        "loose key",
        &l,
        "warning",
        &["loose.key", "readable by others", "0644"],
    );

    // A bad GCB_LOG.
    let l = echo_twice(&lab, &p1, &[("GCB_LOG", "verbose")], next());
    one_line(
        "GCB_LOG=verbose",
        &l,
        "warning",
        &["\"verbose\"", "error, warn, info", "using warn"],
    );

    // Config file: an unknown key is one line naming file, line and key; its broker is
    // used (no other line: the registration succeeds).
    let conf = dir.join("gcb.conf");
    write(
        &conf,
        &format!("# test\nbrokr = \"{NOBODY}\"\nbroker = \"{P1}\"\n"),
        0o644,
    );
    let conf_s = conf.to_str().unwrap();
    let port = next();
    let l = echo_twice(&lab, &["--conf", conf_s], &[], port);
    one_line(
        "conf unknown key",
        &l,
        "warning",
        &[&format!("{conf_s}:2:"), "brokr", "unknown key"],
    );
    broker.proxy_of("tcp listener", &format!("10.1.0.11:{port}"), RUN);
    // The environment overrides the file: the file's broker is nobody, GCB_BROKER the
    // running one; nothing to say, and the broker registers the listener.
    write(&conf, &format!("broker = \"{NOBODY}\"\n"), 0o644);
    let port = next();
    let l = echo_twice(&lab, &["--conf", conf_s], &[("GCB_BROKER", P1)], port);
    assert!(l.is_empty(), "env over conf: {l:#?}");
    broker.proxy_of("tcp listener", &format!("10.1.0.11:{port}"), RUN);
    // And without the override the file's (unreachable) broker is used and said.
    let l = echo_twice(&lab, &["--conf", conf_s], &[], next());
    one_line(
        "conf broker",
        &l,
        "warning",
        &[&format!("broker {NOBODY}:9650")],
    );
    // A GCB_CONF that does not exist: one error line, the program runs.
    let l = echo_twice(
        &lab,
        &[],
        &[("GCB_CONF", dir.join("nope.conf").to_str().unwrap())],
        next(),
    );
    one_line(
        "missing GCB_CONF",
        &l,
        "error",
        &["nope.conf", "No such file"],
    );
}

#[test]
fn broker_lost_and_refused_are_said_once() {
    brokerd();
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("clientlost", &lab);
    let mut broker = Broker::start(
        &lab,
        Host::P1,
        P1,
        true,
        &["--max-registrations-per-ip", "1"],
        &dir.join("broker.log"),
    );
    // Two listeners: the second is refused (quota), said once; the first registered and
    // waits in accept().
    let prog = r#"
import socket
a = socket.socket(); a.bind(("0.0.0.0", 18500)); a.listen(4)
b = socket.socket(); b.bind(("0.0.0.0", 18501)); b.listen(4)
print("listening", flush=True)
a.accept()  # the shim runs its event handler (heartbeats) inside the program's wait
"#;
    let mut c = gcb_run(&lab, Host::A1, true, &["--broker", P1], None);
    c.args(["python3", "-c", prog])
        .env("GCB_HEARTBEAT_MS", "200");
    let server = lab.spawn_logged(&mut c, &dir, "server");
    wait_line(&server.out, RUN, |l| l == "listening").expect("server up");
    broker.proxy_of("tcp listener", "10.1.0.11:18500", RUN);
    let refused = wait_line(&server.err, RUN, |l| l.contains("refused"));
    assert!(
        refused
            .as_deref()
            .is_some_and(|l| l.starts_with("gcb: error: ") && l.contains("Quota")),
        "refused line: {refused:?}\n{}",
        read_text(&server.err)
    );
    // The broker goes away: heartbeats go unanswered, said once however many fail.
    broker.proc.kill().unwrap();
    let lost = wait_line(&server.err, RUN, |l| l.contains("stopped answering"));
    assert!(
        lost.as_deref().is_some_and(
            |l| l.starts_with("gcb: warning: ") && l.contains(&format!("broker {P1}:9650"))
        ),
        "lost line: {lost:?}\n{}",
        read_text(&server.err)
    );
    // Several more heartbeat deadlines (5 s each) pass: still one line each.
    std::thread::sleep(Duration::from_secs(12));
    let err = read_text(&server.err);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "want the refused and the lost line only:\n{err}"
    );
    assert_eq!(read_text(&server.out), "listening\n");
}

#[test]
fn check_probes_the_daemons() {
    brokerd();
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("clientcheck", &lab);
    let _broker = Broker::start(
        &lab,
        Host::P1,
        P1,
        true,
        &["--log", "trace"],
        &dir.join("broker.log"),
    );
    let _portfwd = Portfwd::start(
        &lab,
        &dir,
        &[
            "--private",
            "10.1.0.0/24",
            "--ports",
            "20000-20099",
            "--log",
            "trace",
        ],
    );
    let check = |opts: &[&str], keyed: bool| {
        let mut c = lab.cmd_keyed(Host::A1, keyed, gcb_run_script());
        c.env("GCB_LIB", libgcb()).args(opts);
        finish(&lab, &mut c)
    };
    let out = check(&["--check", "--broker", P1, "--dpf", "10.1.0.1"], true);
    let err = text(&out.stderr);
    assert!(
        out.status.code() == Some(0)
            && err.contains(&format!("broker {P1}:9650: answering (pool key accepted)"))
            && err.contains("portfwd 10.1.0.1:9651: answering (pool key accepted)")
            && err.contains("gcb-check: library ")
            && err.contains("broker = \"203.0.113.10\" (GCB_BROKER)"),
        "check against running daemons: {:?}\n{err}",
        out.status
    );
    assert!(out.stdout.is_empty());
    let out = check(&["--check", "--broker", NOBODY], true);
    let err = text(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains(&format!("broker {NOBODY}:9650: NOT answering")),
        "check against nothing: {:?}\n{err}",
        out.status
    );
    // The wrong key: the broker drops what it cannot authenticate.
    let other = dir.join("other.key");
    write(&other, &"ab".repeat(32), 0o600);
    let out = check(
        &[
            "--check",
            "--broker",
            P1,
            "--key-file",
            other.to_str().unwrap(),
        ],
        true,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

fn gcb_run_plain() -> Command {
    let mut c = Command::new(repo_root().join("scripts/gcb-run"));
    c.env("GCB_LIB", libgcb())
        .env_remove("GCB_BROKER")
        .env_remove("GCB_DPF_SERVER")
        .env_remove("GCB_KEY_FILE")
        .env_remove("GCB_LOG")
        .env_remove("GCB_CONF");
    c
}

#[test]
fn gcb_run_rejects_bad_options() {
    let key = std::env::temp_dir().join(format!("gcb-clienterr-{}.key", std::process::id()));
    write(&key, &"cd".repeat(32), 0o600);
    let k = key.to_str().unwrap();
    for (opts, needle) in [
        (
            vec!["--log", "verbose"],
            "error, warn, info, debug, trace, off",
        ),
        (vec!["--broker", "bogus"], "not an IPv4 address"),
        (vec!["--broker", "[::1]:41203"], "IPv6"),
        (vec!["--broker", "10.0.0.1:99999"], "out of range"),
        (vec!["--dpf=10.0.0.1:0"], "out of range"),
        (
            vec!["--broker", "10.0.0.1", "--key-file", "/nonexistent/k"],
            "/nonexistent/k",
        ),
        (
            vec!["--broker", "10.0.0.1", "--key-file", k, "--frob"],
            "unknown option --frob",
        ),
    ] {
        let out = gcb_run_plain()
            .args(&opts)
            .args(["--", "sh", "-c", "echo RAN"])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(
            out.status.code() == Some(2)
                && out.stdout.is_empty()
                && err.lines().count() == 1
                && err.starts_with("gcb-run: error: ")
                && err.contains(needle),
            "{opts:?}: {:?} stdout {:?} stderr {err:?}",
            out.status,
            text(&out.stdout)
        );
    }
    // A GCB_LIB that names no file is said, not replaced by another copy of the library.
    let out = gcb_run_plain()
        .env("GCB_LIB", "/nonexistent/libgcb.so")
        .args([
            "--broker",
            "10.0.0.1",
            "--key-file",
            k,
            "--",
            "sh",
            "-c",
            "echo RAN",
        ])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        out.status.code() == Some(2)
            && out.stdout.is_empty()
            && err.lines().count() == 1
            && err.starts_with("gcb-run: error: GCB_LIB=/nonexistent/libgcb.so: no such file"),
        "missing GCB_LIB: {:?} stderr {err:?}",
        out.status
    );
    // --generate-key: 64 hex characters, mode 0600, never overwrites.
    let gen = std::env::temp_dir().join(format!("gcb-clienterr-{}.gen", std::process::id()));
    let _ = fs::remove_file(&gen);
    let out = gcb_run_plain()
        .arg("--generate-key")
        .arg(&gen)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta = fs::metadata(&gen).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let hex = fs::read_to_string(&gen).unwrap();
    assert!(hex.trim().len() == 64 && hex.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    let again = gcb_run_plain()
        .arg("--generate-key")
        .arg(&gen)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(fs::read_to_string(&gen).unwrap(), hex, "overwritten");
    let _ = fs::remove_file(&gen);
    let _ = fs::remove_file(&key);
}

#[test]
fn static_and_go_programs_are_warned() {
    let dir = std::env::temp_dir().join(format!("gcb-clientstatic-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let src = dir.join("hello.c");
    fs::write(
        &src,
        "#include <stdio.h>\nint main(void){puts(\"hello\");return 0;}\n",
    )
    .unwrap();
    let bin = dir.join("hello-static");
    let cc = Command::new("cc")
        .arg("-static")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("cc (scripts/install-deps installs it)");
    assert!(
        cc.status.success(),
        "cc -static failed (scripts/install-deps installs libc6-dev): {}",
        text(&cc.stderr)
    );
    // A Go program's mark (its build info) in an otherwise dynamically linked program.
    let go = dir.join("fake-go");
    let mut bytes = fs::read("/bin/true").unwrap();
    bytes.extend_from_slice(b"\xff Go buildinf:\x08\x02");
    write(&go, "", 0o755);
    fs::write(&go, bytes).unwrap();
    for (prog, needle, want_out) in [
        (&bin, "statically linked", "hello\n"),
        (&go, "Go program", ""),
    ] {
        let out = gcb_run_plain().arg("--").arg(prog).output().unwrap();
        let err = text(&out.stderr);
        assert!(
            out.status.success()
                && text(&out.stdout) == want_out
                && err.lines().count() == 1
                && err.starts_with("gcb-run: warning: ")
                && err.contains(needle),
            "{}: {:?} stdout {:?} stderr {err:?}",
            prog.display(),
            out.status,
            text(&out.stdout)
        );
        let quiet = gcb_run_plain()
            .arg("-q")
            .arg("--")
            .arg(prog)
            .output()
            .unwrap();
        assert!(quiet.stderr.is_empty(), "-q: {}", text(&quiet.stderr));
    }
    // A dynamically linked C program is not warned about.
    let out = gcb_run_plain().args(["--", "/bin/true"]).output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        text(&out.stderr)
    );
    let _ = fs::remove_dir_all(&dir);
}

/// `NAME 0.x.y (COMMIT)`: COMMIT must be a commit of this repository.
fn assert_version(name: &str, line: &str) {
    let commit = line
        .rsplit_once('(')
        .and_then(|(_, c)| c.trim().strip_suffix(')'))
        .unwrap_or_else(|| panic!("{name} --version: {line:?} has no (commit)"));
    assert!(
        line.contains(" 0.") && commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name} --version: {line:?}"
    );
    let known = Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .unwrap();
    assert!(
        known.success(),
        "{name} --version names {commit}, not a commit here"
    );
}

#[test]
fn every_binary_has_help_and_version() {
    for name in [
        "gcb-brokerd",
        "gcb-portfwd",
        "gcb-dpf-request",
        "gcb-bench-conn",
        "gcb-bench-register",
        "gcb-echo-client",
        "gcb-echo-server",
        "gcb-mtclient",
        "gcb-pingpong",
        "gcb-pool-collector",
        "gcb-pool-scheduler",
        "gcb-pool-worker",
    ] {
        let bin = artifact(name);
        let help = Command::new(&bin).arg("--help").output().unwrap();
        assert!(
            help.status.success() && text(&help.stdout).to_lowercase().contains("usage"),
            "{name} --help: {:?}\n{}{}",
            help.status,
            text(&help.stdout),
            text(&help.stderr)
        );
        assert!(
            !text(&help.stdout)
                .lines()
                .any(|l| l.starts_with("ns_per_rtt=")),
            "{name} --help ran the benchmark"
        );
        let v = Command::new(&bin).arg("--version").output().unwrap();
        assert!(v.status.success(), "{name} --version: {:?}", v.status);
        assert_version(name, text(&v.stdout).trim());
    }
    let v = gcb_run_plain().arg("--version").output().unwrap();
    assert!(v.status.success());
    let line = text(&v.stdout);
    let lib_part = line.split(" at ").next().unwrap_or_default();
    assert!(line.starts_with("gcb-run: libgcb "), "{line}");
    assert_version("gcb-run", lib_part);
    let h = gcb_run_plain().arg("--help").output().unwrap();
    assert!(h.status.success() && text(&h.stdout).contains("--check"));
    // A usage error is not a connection attempt to "--frob".
    let bad = Command::new(artifact("gcb-mtclient"))
        .arg("--frob")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

#[test]
fn small_fixes() {
    // Nothing listens on 127.0.0.1:9: said within the default 3 s, naming the address.
    let out = Command::new(artifact("gcb-dpf-request"))
        .args(["--server", "127.0.0.1:9", "query", "10.0.0.1:5"])
        .env_remove("GCB_KEY_FILE")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains("127.0.0.1:9")
            && err.contains("nothing answered"),
        "{:?} {err}",
        out.status
    );
    let out = Command::new(brokerd())
        .args(["--listen", "127.0.0.1:99999", "--insecure"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("99999") && err.contains("out of range"),
        "{err}"
    );
    // --log trace: accepted (the lab test check_probes_the_daemons runs both with it).
    let out = Command::new(brokerd())
        .args(["--log", "trace", "--listen", "127.0.0.1:99999"])
        .output()
        .unwrap();
    assert!(
        !text(&out.stderr).contains("--log"),
        "{}",
        text(&out.stderr)
    );
}
