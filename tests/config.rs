//! Issue #13, item 2: the daemons' configuration files (`gcb_proto::conf`), with the real
//! binaries. A broker and a portfwd run from their files alone and serve real traffic;
//! the layers' order (file < environment < command line) is checked on a limit whose
//! effect is visible; a bad file stops the daemon with one line naming file, line and key.

use std::fs::{self, File};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gcb_lab::{
    brokerd, gcb_run, libgcb, parse_after, portfwd_bin, python, random_bytes, read_text, sha256,
    wait_line, wait_until, Host, Lab, Proc, Scratch,
};

const P1: &str = "203.0.113.10";
const A1: &str = "10.1.0.11";
const UP: Duration = Duration::from_secs(15);

/// Runs `cmd` to completion (it must exit on its own) and returns its output.
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// Starts a daemon with only `--config FILE` (no pool key in its environment: the file
/// must name it), logging to `log`, and waits for its "listening on udp" line.
fn start_from_file(
    lab: &Lab,
    host: Host,
    bin: PathBuf,
    conf: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> (Proc, String) {
    let mut cmd = lab.cmd(host, bin);
    cmd.env_remove("GCB_KEY_FILE")
        .envs(env.iter().copied())
        .arg("--config")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    let mut proc = lab.spawn(&mut cmd).expect("spawn daemon");
    let line = wait_line(log, UP, |l| l.contains("listening on udp "));
    let exited = proc.wait_timeout(Duration::ZERO).ok().flatten();
    let Some(line) = line.filter(|_| exited.is_none()) else {
        panic!("daemon did not come up ({exited:?}):\n{}", read_text(log));
    };
    (proc, line)
}

/// python http.server on `port` in a1 under gcb-run with `opts`, serving `www`.
fn http_server(lab: &Lab, dir: &Scratch, opts: &[&str], port: u16, name: &str) -> Proc {
    let log = dir.join(format!("{name}.shim.log"));
    let mut cmd = gcb_run(lab, Host::A1, true, opts, Some(("info", &log)));
    cmd.arg(python())
        .args([
            "-u",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "0.0.0.0",
        ])
        .current_dir(dir.join("www"))
        .stdout(File::create(dir.join(format!("{name}.out"))).unwrap())
        .stderr(File::create(dir.join(format!("{name}.err"))).unwrap());
    lab.spawn(&mut cmd).expect("spawn http.server")
}

/// sha256 of `http://ADDR/f.bin` fetched by curl from p1.
fn fetch(lab: &Lab, addr: SocketAddrV4) -> String {
    let mut c = lab.cmd(Host::P1, "curl");
    c.args(["-sS", "--max-time", "20", "-o", "-"])
        .arg(format!("http://{addr}/f.bin"));
    let out = output(&mut c);
    assert!(
        out.status.success(),
        "curl {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sha256(&out.stdout)
}

#[test]
#[ignore = "lab: needs root and network namespaces (run with --include-ignored)"]
fn broker_and_portfwd_serve_from_their_config_files_alone() {
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("config-run", &lab);
    fs::create_dir_all(dir.join("www")).unwrap();
    let data = random_bytes(1 << 20);
    fs::write(dir.join("www/f.bin"), &data).unwrap();
    let key = lab.key_file().display().to_string();

    let broker_conf = dir.join("brokerd.toml");
    fs::write(
        &broker_conf,
        format!(
            "# the broker of the lab\nlisten = \"{P1}\"\nkey_file = \"{key}\"\n\
             stats_interval_secs = 1\nallow = [\"203.0.113.0/24\", \"10.0.0.0/8\"]\n\
             admin_socket = \"{}\"\n",
            dir.join("brokerd.sock").display()
        ),
    )
    .unwrap();
    let blog = dir.join("broker.log");
    let (_broker, _) = start_from_file(&lab, Host::P1, brokerd(), &broker_conf, &[], &blog);

    let pf_conf = dir.join("portfwd.toml");
    let state = dir.join("pf-state");
    fs::write(
        &pf_conf,
        format!(
            "public = \"203.0.113.1\"\nprivate = \"10.1.0.0/24\"\nports = \"21000-21099\"\n\
             state = \"{}\"\nkey_file = \"{key}\"\nprobe_timeout_ms = 500\n\
             admin_socket = \"{}\"\n",
            state.display(),
            dir.join("portfwd.sock").display()
        ),
    )
    .unwrap();
    let plog = dir.join("portfwd.log");
    let (_pf, line) = start_from_file(&lab, Host::Gwa, portfwd_bin(), &pf_conf, &[], &plog);
    let pf_addr = parse_after(&line, "listening on udp ");
    assert_eq!(pf_addr.ip().to_string(), "10.1.0.1", "{line}");

    // GCB: a server in a1 registers with the broker from the file, and a client on p1
    // gets the file through its proxy.
    let _gcb_srv = http_server(&lab, &dir, &["--broker", P1], 8000, "gcb");
    let needle = format!("registered tcp listener local {A1}:8000 ");
    let reg = wait_line(&blog, UP, |l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no registration:\n{}", read_text(&blog)));
    let proxy = parse_after(&reg, "-> proxy ");
    assert_eq!(fetch(&lab, proxy), sha256(&data));
    // The file's stats interval (1 s instead of 300) is in force.
    wait_until("two stats lines", UP, || {
        read_text(&blog).matches(" stats ").count() >= 2
    });

    // DPF: a server in a1 gets a port from the file's range.
    let _dpf_srv = http_server(&lab, &dir, &["--dpf", &pf_addr.to_string()], 8001, "dpf");
    let added = wait_line(&plog, UP, |l| l.contains("added ") && l.contains(":8001"))
        .unwrap_or_else(|| panic!("no mapping:\n{}", read_text(&plog)));
    // "added 203.0.113.1:PORT/tcp -> 10.1.0.11:8001"
    let word = added.split_once("added ").unwrap().1;
    let public: SocketAddrV4 = word.split('/').next().unwrap().parse().unwrap();
    assert!((21000..=21099).contains(&public.port()), "{added}");
    assert_eq!(fetch(&lab, public), sha256(&data));
}

#[test]
#[ignore = "lab: needs root and network namespaces (run with --include-ignored)"]
fn environment_overrides_the_file_and_the_command_line_overrides_both() {
    libgcb();
    let lab = Lab::up();
    let dir = Scratch::new("config-order", &lab);
    fs::create_dir_all(dir.join("www")).unwrap();
    fs::write(dir.join("www/f.bin"), b"x").unwrap();
    let key = lab.key_file().display().to_string();
    let conf = dir.join("brokerd.toml");
    fs::write(
        &conf,
        format!("listen = \"{P1}\"\nkey_file = \"{key}\"\nmax_registrations_per_ip = 1\n"),
    )
    .unwrap();

    // Each run: two listeners in a1; how many register shows the limit in force.
    let registered = |run: &str, env: &[(&str, &str)], args: &[&str]| -> usize {
        let blog = dir.join(format!("broker-{run}.log"));
        let mut cmd = lab.cmd(Host::P1, brokerd());
        cmd.env_remove("GCB_KEY_FILE")
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&conf)
            .arg("--admin-socket")
            .arg(dir.join(format!("{run}.sock")))
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(&blog).unwrap());
        let mut broker = lab.spawn(&mut cmd).expect("spawn broker");
        assert!(
            wait_line(&blog, UP, |l| l.contains("listening on udp")).is_some(),
            "{}",
            read_text(&blog)
        );
        let _s1 = http_server(&lab, &dir, &["--broker", P1], 8101, &format!("{run}-1"));
        let _s2 = http_server(&lab, &dir, &["--broker", P1], 8102, &format!("{run}-2"));
        // Both have been answered: registered, or refused for the quota.
        wait_until("both listeners answered", UP, || {
            let t = read_text(&blog);
            t.matches("registered tcp listener").count() + t.matches(": quota: ").count() >= 2
        });
        broker.signal_group(libc::SIGTERM);
        let _ = broker.wait_timeout(Duration::from_secs(10));
        read_text(&blog).matches("registered tcp listener").count()
    };
    assert_eq!(registered("file", &[], &[]), 1, "the file's limit of 1");
    let env = [("GCB_BROKERD_MAX_REGISTRATIONS_PER_IP", "2")];
    assert_eq!(registered("env", &env, &[]), 2, "the environment's 2");
    let cli = ["--max-registrations-per-ip", "1"];
    assert_eq!(registered("cli", &env, &cli), 1, "the command line's 1");
}

/// `--check-config` and bad files, without a lab: the daemons exit before binding.
#[test]
fn check_config_prints_each_value_and_its_source() {
    let dir = tempdir("check");
    let key = dir.join("pool.key");
    fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let conf = dir.join("b.toml");
    fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\nkey_file = \"{}\"\nmax_relays = 11\nlease_ms = 30000\n",
            key.display()
        ),
    )
    .unwrap();
    let out = output(
        Command::new(brokerd())
            .env_remove("GCB_KEY_FILE")
            .env("GCB_BROKERD_MAX_RELAYS", "22")
            .args(["--check-config", "--lease-ms", "31000", "--config"])
            .arg(&conf),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf_s = conf.display();
    for want in [
        format!("listen = \"127.0.0.1:0\"  # {conf_s}:1"),
        "max_relays = 22  # environment GCB_BROKERD_MAX_RELAYS".to_string(),
        "lease_ms = 31000  # command line".to_string(),
        "max_relays_per_ip = 256  # default".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "no line {want:?} in:\n{text}"
        );
    }
    // The check reads the key file: a missing one fails the check.
    fs::remove_file(&key).unwrap();
    let out = output(
        Command::new(brokerd())
            .env_remove("GCB_KEY_FILE")
            .args(["--check-config", "--config"])
            .arg(&conf),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool.key"));
}

#[test]
fn a_bad_config_file_is_one_line_naming_file_line_and_key() {
    let dir = tempdir("bad");
    let cases: &[(PathBuf, &str, String)] = &[
        (
            brokerd(),
            "listen = \"127.0.0.1:0\"\ninsecure = true\n\nmax_relay = 4\n",
            "gcb-brokerd: error: {F}:4: unknown key `max_relay` (did you mean `max_relays`?)"
                .to_string(),
        ),
        (
            brokerd(),
            "listen = \"127.0.0.1:0\"\nmax_relays = \"lots\"\n",
            "gcb-brokerd: error: {F}:2: max_relays: invalid value 'lots' for '--max-relays \
             <MAX_RELAYS>': invalid digit found in string"
                .to_string(),
        ),
        (
            portfwd_bin(),
            "public = \"203.0.113.1\"\nprivate = \"10.1.0.0/24\"\nport = \"1-2\"\n",
            "gcb-portfwd: error: {F}:3: unknown key `port` (did you mean `ports`?)".to_string(),
        ),
    ];
    for (i, (bin, text, want)) in cases.iter().enumerate() {
        let conf = dir.join(format!("{i}.toml"));
        fs::write(&conf, text).unwrap();
        let out = output(Command::new(bin).arg("--config").arg(&conf));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(
            err.trim_end(),
            want.replace("{F}", &conf.display().to_string()),
            "case {i}"
        );
    }
    // An explicit file that does not exist is an error; the default one may be absent.
    let out = output(Command::new(brokerd()).args(["--config", "/nonexistent/b.toml"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("gcb-brokerd: error: reading config file /nonexistent/b.toml: "));
}

/// A fresh directory under the target dir for a test that needs no lab.
fn tempdir(name: &str) -> PathBuf {
    let d = gcb_lab::target_dir().join(format!("config-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// The example files in docs/config (the README's deployment) are valid as they are, with
/// only the host-specific paths overridden from the environment.
#[test]
fn the_documented_example_config_files_are_valid() {
    let dir = tempdir("examples");
    let key = dir.join("pool.key");
    fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let docs = gcb_lab::repo_root().join("docs/config");
    /// A daemon, its example file, extra environment, lines its check must print.
    type Run<'a> = (PathBuf, &'a str, Vec<(&'a str, String)>, &'a [&'a str]);
    let runs: [Run; 2] = [
        (
            brokerd(),
            "brokerd.toml",
            vec![],
            &[
                "advertise = \"203.0.113.10\"",
                "proxy_ports = \"40000-40999\"",
            ],
        ),
        (
            portfwd_bin(),
            "portfwd.toml",
            // portfwd's default control address is this host's address inside --private.
            vec![("GCB_PORTFWD_LISTEN", "127.0.0.1:0".to_string())],
            &["ports = \"20000-29999\"", "private = \"10.1.0.0/24\""],
        ),
    ];
    for (bin, file, env, want) in runs {
        let out = output(
            Command::new(bin)
                .env("GCB_KEY_FILE", &key)
                .envs(env)
                .arg("--check-config")
                .arg("--config")
                .arg(docs.join(file)),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        for w in want {
            assert!(text.contains(w), "{file}: no {w:?} in:\n{text}");
        }
    }
}

/// SIGHUP re-reads the file: a changed limit and log level are applied and named in one
/// line; a broken edit is refused with the file, line and key, and the old settings stay.
#[test]
fn sighup_applies_an_edited_config_file_and_refuses_a_broken_one() {
    let dir = tempdir("reload");
    let key = dir.join("pool.key");
    fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let conf = dir.join("b.toml");
    let base = format!(
        "listen = \"127.0.0.1:0\"\nkey_file = \"{}\"\nadmin_socket = \"{}\"\n",
        key.display(),
        dir.join("b.sock").display()
    );
    fs::write(&conf, format!("{base}max_relays = 100\n")).unwrap();
    let log = dir.join("broker.log");
    let mut broker = Command::new(brokerd())
        .env_remove("GCB_KEY_FILE")
        .arg("--config")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn gcb-brokerd");
    let hup = |pid: u32| {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    };
    assert!(
        wait_line(&log, UP, |l| l.contains("listening on udp")).is_some(),
        "{}",
        read_text(&log)
    );
    // `status` finds the admin socket the file names, through --config or the
    // environment, with no --admin-socket.
    for how in ["flag", "env"] {
        let mut c = Command::new(brokerd());
        c.env_remove("GCB_KEY_FILE").arg("status").arg("--json");
        if how == "flag" {
            c.arg("--config").arg(&conf);
        } else {
            c.env("GCB_BROKERD_CONFIG", &conf);
        }
        let out = output(&mut c);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
        assert_eq!(doc["pid"], broker.id(), "{how}: {text}");
    }
    fs::write(&conf, format!("{base}max_relays = 7\nlog = \"debug\"\n")).unwrap();
    hup(broker.id());
    let line = wait_line(&log, UP, |l| l.contains("reloaded: "))
        .unwrap_or_else(|| panic!("no reload line:\n{}", read_text(&log)));
    assert!(
        line.contains("log info->debug") && line.contains("max_relays 100->7"),
        "{line}"
    );
    fs::write(&conf, format!("{base}max_relays = 9\nmax_relay = 3\n")).unwrap();
    hup(broker.id());
    let line = wait_line(&log, UP, |l| l.contains("reload refused"))
        .unwrap_or_else(|| panic!("no refusal:\n{}", read_text(&log)));
    assert!(
        line.contains(&format!("{}:5: unknown key `max_relay`", conf.display())),
        "{line}"
    );
    // Still running, with the last good settings: re-saving them changes nothing.
    assert!(broker.try_wait().unwrap().is_none(), "{}", read_text(&log));
    fs::write(&conf, format!("{base}max_relays = 7\nlog = \"debug\"\n")).unwrap();
    hup(broker.id());
    wait_until("a second reload line", UP, || {
        read_text(&log).matches("reloaded: nothing changed").count() == 1
    });
    broker.kill().unwrap();
    let _ = broker.wait();
}

/// docs/config/gcb.conf, the shim's example, has no line the shim's parser refuses.
#[test]
fn the_documented_shim_config_file_parses_cleanly() {
    let conf = gcb_lab::repo_root().join("docs/config/gcb.conf");
    let dir = tempdir("shimconf");
    let key = dir.join("pool.key");
    fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let mut perms = fs::metadata(&key).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    fs::set_permissions(&key, perms).unwrap();
    // The environment's key file replaces the file's host path.
    let out = output(
        Command::new("/bin/true")
            .env("LD_PRELOAD", libgcb())
            .env("GCB_CONF", &conf)
            .env("GCB_LOG", "debug")
            .env("GCB_KEY_FILE", &key)
            .env_remove("GCB_BROKER"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("gcb.conf:"),
        "a line of the example was refused:\n{err}"
    );
    // The file was read: its broker turned GCB on (no GCB_BROKER in the environment).
    assert!(err.contains("gcb mode"), "{err}");
}
