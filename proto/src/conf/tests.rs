use super::*;
use clap::{CommandFactory, Parser};
use std::collections::HashMap;

/// A daemon's flags, shaped like the real ones.
#[derive(Parser, Debug)]
#[command(name = "testd")]
struct Args {
    #[arg(long, required_unless_present = "generate_key")]
    listen: Option<String>,
    #[arg(long, env = "GCB_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[arg(long)]
    insecure: bool,
    #[arg(long = "allow")]
    allow: Vec<String>,
    #[arg(long, default_value_t = 1024)]
    max_relays: usize,
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    #[arg(long)]
    generate_key: Option<PathBuf>,
}

struct World {
    files: HashMap<PathBuf, String>,
    env: HashMap<String, String>,
}

impl World {
    fn new() -> World {
        World {
            files: HashMap::new(),
            env: HashMap::new(),
        }
    }
    fn file(mut self, path: &str, text: &str) -> World {
        self.files.insert(PathBuf::from(path), text.to_string());
        self
    }
    fn env(mut self, k: &str, v: &str) -> World {
        self.env.insert(k.to_string(), v.to_string());
        self
    }
    fn parse(&self, argv: &[&str]) -> Result<Layered<Args>, ConfError> {
        self.parse_as::<Args>(argv)
    }
    fn parse_as<T: clap::CommandFactory + FromArgMatches>(
        &self,
        argv: &[&str],
    ) -> Result<Layered<T>, ConfError> {
        let read = |p: &Path| {
            self.files
                .get(p)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        };
        let env = |k: &str| self.env.get(k).map(OsString::from);
        let sources = Sources {
            env_prefix: "GCB_TESTD",
            default_file: Path::new("/etc/gcb/testd.toml"),
            read_file: &read,
            env: &env,
        };
        let mut v = vec![OsString::from("testd")];
        v.extend(argv.iter().map(OsString::from));
        parse::<T>(v, &sources)
    }
}

const FILE: &str = "/etc/gcb/testd.toml";

#[test]
fn no_file_is_fine_and_defaults_apply() {
    let l = World::new().parse(&["--listen", "1.2.3.4"]).unwrap();
    assert_eq!(l.args.listen.as_deref(), Some("1.2.3.4"));
    assert_eq!(l.args.max_relays, 1024);
    assert!(l.file.is_none());
    assert!(!l.check_config);
}

#[test]
fn file_sets_flags_with_either_spelling() {
    let w = World::new().file(
        FILE,
        "# broker\nlisten = \"10.0.0.1:9650\"\nmax-relays = 7\nrate = 2.5\ninsecure = true\nallow = [\"10.0.0.0/8\", \"1.2.3.4\"]\n",
    );
    let l = w.parse(&[]).unwrap();
    assert_eq!(l.args.listen.as_deref(), Some("10.0.0.1:9650"));
    assert_eq!(l.args.max_relays, 7);
    assert_eq!(l.args.rate, 2.5);
    assert!(l.args.insecure);
    assert_eq!(l.args.allow, vec!["10.0.0.0/8", "1.2.3.4"]);
    assert_eq!(l.file.as_deref(), Some(Path::new(FILE)));
    let w = World::new().file(FILE, "listen = \"x\"\nmax_relays = 9\n");
    assert_eq!(w.parse(&[]).unwrap().args.max_relays, 9);
}

#[test]
fn precedence_is_file_then_environment_then_command_line() {
    let w = World::new().file(
        FILE,
        "listen = \"file\"\nmax_relays = 1\nallow = [\"f1\", \"f2\"]\n",
    );
    // File alone.
    let l = w.parse(&[]).unwrap();
    assert_eq!(
        (l.args.listen.as_deref(), l.args.max_relays),
        (Some("file"), 1)
    );
    // Environment beats the file.
    let w = w.env("GCB_TESTD_MAX_RELAYS", "2");
    let l = w.parse(&[]).unwrap();
    assert_eq!(l.args.max_relays, 2);
    // The command line beats both; a repeatable flag replaces the file's list.
    let l = w
        .parse(&["--max-relays", "3", "--listen=cli", "--allow", "c1"])
        .unwrap();
    assert_eq!(
        (l.args.listen.as_deref(), l.args.max_relays),
        (Some("cli"), 3)
    );
    assert_eq!(l.args.allow, vec!["c1"]);
    // The existing shared variable keeps its name.
    let w = World::new()
        .file(FILE, "listen = \"x\"\nkey_file = \"/file/key\"\n")
        .env("GCB_KEY_FILE", "/env/key");
    assert_eq!(
        w.parse(&[]).unwrap().args.key_file.as_deref(),
        Some(Path::new("/env/key"))
    );
}

#[test]
fn explicit_config_path_from_flag_or_environment() {
    let w = World::new().file("/tmp/other.toml", "listen = \"other\"\n");
    let l = w.parse(&["--config", "/tmp/other.toml"]).unwrap();
    assert_eq!(l.args.listen.as_deref(), Some("other"));
    let l = w.parse(&["--config=/tmp/other.toml"]).unwrap();
    assert_eq!(l.args.listen.as_deref(), Some("other"));
    let w = w.env("GCB_TESTD_CONFIG", "/tmp/other.toml");
    assert_eq!(w.parse(&[]).unwrap().args.listen.as_deref(), Some("other"));
    // A missing explicit file is an error naming it; a missing default is not.
    let e = World::new()
        .parse(&["--config", "/nope.toml", "--listen", "x"])
        .unwrap_err();
    assert!(matches!(e, ConfError::Read { .. }), "{e}");
    assert!(e.to_string().contains("/nope.toml"), "{e}");
}

#[test]
fn unknown_keys_name_file_line_and_key_with_a_hint() {
    let w = World::new().file(FILE, "listen = \"x\"\n\nmax_relay = 4\n");
    let e = w.parse(&[]).unwrap_err().to_string();
    assert_eq!(
        e,
        "/etc/gcb/testd.toml:3: unknown key `max_relay` (did you mean `max_relays`?)"
    );
    let w = World::new().file(FILE, "colour = \"blue\"\n");
    let e = w.parse(&["--listen", "x"]).unwrap_err().to_string();
    assert_eq!(e, "/etc/gcb/testd.toml:1: unknown key `colour`");
    // Command-line-only flags are not keys.
    for key in [
        "config",
        "check_config",
        "generate_key",
        "help",
        "version",
        "generate_man",
        "generate-completions",
    ] {
        let w = World::new().file(FILE, &format!("{key} = \"x\"\n"));
        let e = w.parse(&["--listen", "x"]).unwrap_err();
        assert!(matches!(e, ConfError::UnknownKey { .. }), "{key}: {e}");
    }
}

#[test]
fn bad_values_and_syntax_name_file_and_line() {
    let w = World::new().file(FILE, "listen = \"x\"\nmax_relays = \"many\"\n");
    let e = w.parse(&[]).unwrap_err().to_string();
    assert!(
        e.starts_with("/etc/gcb/testd.toml:2: max_relays: invalid value 'many'"),
        "{e}"
    );
    let w = World::new().file(FILE, "listen = \"x\"\ninsecure = \"yes\"\n");
    let e = w.parse(&[]).unwrap_err().to_string();
    assert_eq!(
        e,
        "/etc/gcb/testd.toml:2: insecure: expected true or false, not string"
    );
    let w = World::new().file(FILE, "listen = [\"a\", \"b\"]\n");
    let e = w.parse(&[]).unwrap_err().to_string();
    assert_eq!(
        e,
        "/etc/gcb/testd.toml:1: listen: takes one value, not a list"
    );
    let w = World::new().file(FILE, "listen = \"x\"\n[section]\nk = 1\n");
    let e = w.parse(&[]).unwrap_err().to_string();
    assert!(
        e.starts_with("/etc/gcb/testd.toml:2: section: sections are not used"),
        "{e}"
    );
    let w = World::new().env("GCB_TESTD_MAX_RELAYS", "lots");
    let e = w.parse(&["--listen", "x"]).unwrap_err().to_string();
    assert!(
        e.starts_with("environment GCB_TESTD_MAX_RELAYS: invalid value 'lots'"),
        "{e}"
    );
    let w = World::new().env("GCB_TESTD_INSECURE", "maybe");
    let e = w.parse(&["--listen", "x"]).unwrap_err().to_string();
    assert_eq!(
        e,
        "environment GCB_TESTD_INSECURE: expected true or false, not `maybe`"
    );
    let w = World::new().file(FILE, "listen = \"x\"\nmax_relays = = 3\n");
    let e = w.parse(&[]).unwrap_err();
    assert!(matches!(e, ConfError::Syntax { line: 2, .. }), "{e}");
}

#[test]
fn environment_variables_are_generated_for_every_flag() {
    let w = World::new()
        .env("GCB_TESTD_LISTEN", "envhost")
        .env("GCB_TESTD_ALLOW", "10.9.0.0/16, 10.8.0.1")
        .env("GCB_TESTD_INSECURE", "true");
    let l = w.parse(&[]).unwrap();
    assert_eq!(l.args.listen.as_deref(), Some("envhost"));
    assert_eq!(l.args.allow, vec!["10.9.0.0/16", "10.8.0.1"]);
    assert!(l.args.insecure);
    let w = World::new().env("GCB_TESTD_INSECURE", "0");
    assert!(!w.parse(&["--listen", "x"]).unwrap().args.insecure);
}

#[test]
fn help_and_version_come_back_as_cli_errors() {
    let e = World::new().parse(&["--help"]).unwrap_err();
    match e {
        ConfError::Cli(e) => {
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
            let text = e.to_string();
            assert!(text.contains("--config <FILE>"), "{text}");
            assert!(text.contains("GCB_TESTD_MAX_RELAYS"), "{text}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn effective_settings_say_where_each_value_came_from() {
    let w = World::new()
        .file(
            FILE,
            "listen = \"10.0.0.1\"\nmax_relays = 5\nallow = [\"a\", \"b\"]\n",
        )
        .env("GCB_TESTD_RATE", "3.5");
    let l = w.parse(&["--check-config", "--insecure"]).unwrap();
    assert!(l.check_config);
    let eff = l.effective();
    assert!(
        eff.contains("listen = \"10.0.0.1\"  # /etc/gcb/testd.toml:1\n"),
        "{eff}"
    );
    assert!(
        eff.contains("max_relays = 5  # /etc/gcb/testd.toml:2\n"),
        "{eff}"
    );
    assert!(
        eff.contains("allow = [\"a\", \"b\"]  # /etc/gcb/testd.toml:3\n"),
        "{eff}"
    );
    assert!(
        eff.contains("rate = 3.5  # environment GCB_TESTD_RATE\n"),
        "{eff}"
    );
    assert!(eff.contains("insecure = true  # command line\n"), "{eff}");
    assert!(eff.contains("# key_file = (not set)\n"), "{eff}");
    assert!(!eff.contains("check_config"), "{eff}");
    // What it prints is itself a valid config file that gives the same settings.
    let again = World::new().file(FILE, &eff).parse(&[]).unwrap();
    assert_eq!(again.args.max_relays, 5);
    assert_eq!(again.args.rate, 3.5);
    assert_eq!(again.args.allow, vec!["a", "b"]);
    assert!(again.args.insecure);
}

/// A daemon with a `status` subcommand that shares one setting with it.
#[derive(Parser, Debug)]
#[command(name = "testd", args_conflicts_with_subcommands = true)]
struct WithStatus {
    #[arg(long, required = true)]
    listen: Option<String>,
    #[arg(long, default_value = "/run/d.sock")]
    admin_socket: String,
    #[command(subcommand)]
    cmd: Option<Sub>,
}

#[derive(clap::Subcommand, Debug, PartialEq)]
enum Sub {
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/run/d.sock")]
        admin_socket: String,
    },
}

#[test]
fn a_subcommand_takes_the_keys_it_knows_and_ignores_the_daemons_others() {
    let w = World::new().file(FILE, "listen = \"x\"\nadmin_socket = \"/f.sock\"\n");
    let l = w.parse_as::<WithStatus>(&["status", "--json"]).unwrap();
    assert_eq!(
        l.args.cmd,
        Some(Sub::Status {
            json: true,
            admin_socket: "/f.sock".into()
        })
    );
    // The daemon itself still reads both.
    let l = w.parse_as::<WithStatus>(&[]).unwrap();
    assert_eq!(
        (l.args.listen.as_deref(), l.args.admin_socket.as_str()),
        (Some("x"), "/f.sock")
    );
    // Environment and command line over the file, for the subcommand too.
    let w = w.env("GCB_TESTD_ADMIN_SOCKET", "/e.sock");
    let l = w.parse_as::<WithStatus>(&["status"]).unwrap();
    assert!(
        matches!(l.args.cmd, Some(Sub::Status { ref admin_socket, .. }) if admin_socket == "/e.sock")
    );
    let l = w
        .parse_as::<WithStatus>(&["status", "--admin-socket", "/c.sock"])
        .unwrap();
    assert!(
        matches!(l.args.cmd, Some(Sub::Status { ref admin_socket, .. }) if admin_socket == "/c.sock")
    );
    // --config works after the subcommand's name, and unknown keys are still errors.
    let w = World::new().file("/o.toml", "admin_socket = \"/o.sock\"\nbogus = 1\n");
    let e = w
        .parse_as::<WithStatus>(&["status", "--config", "/o.toml"])
        .unwrap_err();
    assert_eq!(e.to_string(), "/o.toml:2: unknown key `bogus`");
    let w = World::new().file("/o.toml", "admin_socket = \"/o.sock\"\n");
    let l = w
        .parse_as::<WithStatus>(&["status", "--config", "/o.toml"])
        .unwrap();
    assert!(
        matches!(l.args.cmd, Some(Sub::Status { ref admin_socket, .. }) if admin_socket == "/o.sock")
    );
}

/// A daemon whose flags are required (non-Option), as portfwd's are.
#[derive(Parser, Debug)]
#[command(name = "testd")]
struct Strict {
    #[arg(long)]
    public: String,
    #[arg(long)]
    admin_socket: Option<String>,
    #[arg(long, default_value_t = 1)]
    quota: usize,
}

/// A `status` command's own arguments.
#[derive(clap::Args, Debug)]
struct StatusOnly {
    #[arg(long)]
    json: bool,
    #[arg(long)]
    admin_socket: Option<String>,
}

#[test]
fn a_separate_subcommand_struct_reads_its_keys_from_the_daemons_layers() {
    let w = World::new().file(
        FILE,
        "public = \"1.2.3.4\"\nadmin_socket = \"/f.sock\"\nquota = 3\n",
    );
    let read = |p: &Path| {
        w.files
            .get(p)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    };
    let run = |env: &HashMap<String, String>, argv: &[&str]| {
        let envf = |k: &str| env.get(k).map(OsString::from);
        let sources = Sources {
            env_prefix: "GCB_TESTD",
            default_file: Path::new(FILE),
            read_file: &read,
            env: &envf,
        };
        let mut v = vec![OsString::from("testd")];
        v.extend(argv.iter().map(OsString::from));
        parse_subcommand::<Strict, StatusOnly>("status", v, &sources)
    };
    let none = HashMap::new();
    let s = run(&none, &["status", "--json"]).unwrap();
    assert!(s.json);
    assert_eq!(s.admin_socket.as_deref(), Some("/f.sock"));
    let env: HashMap<String, String> =
        [("GCB_TESTD_ADMIN_SOCKET".to_string(), "/e.sock".to_string())].into();
    assert_eq!(
        run(&env, &["status"]).unwrap().admin_socket.as_deref(),
        Some("/e.sock")
    );
    let s = run(&env, &["status", "--admin-socket", "/c.sock"]).unwrap();
    assert_eq!(s.admin_socket.as_deref(), Some("/c.sock"));
    // No file at all, and the daemon's required --public is not asked for.
    let empty = World::new();
    let read_none = |p: &Path| {
        empty
            .files
            .get(p)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    };
    let envf = |_: &str| None;
    let sources = Sources {
        env_prefix: "GCB_TESTD",
        default_file: Path::new(FILE),
        read_file: &read_none,
        env: &envf,
    };
    let argv = vec![OsString::from("testd"), OsString::from("status")];
    let s = parse_subcommand::<Strict, StatusOnly>("status", argv, &sources).unwrap();
    assert_eq!((s.json, s.admin_socket), (false, None));
}

#[test]
fn docs_flags_are_seen_before_parsing_in_either_spelling() {
    let argv = |v: &[&str]| -> Vec<OsString> { v.iter().map(OsString::from).collect() };
    assert_eq!(docs_request(&argv(&["testd", "--listen", "x"])), None);
    assert_eq!(
        docs_request(&argv(&[
            "testd",
            "--generate-man",
            "/m",
            "--generate-completions=/c"
        ])),
        Some(DocsRequest {
            man: Some(PathBuf::from("/m")),
            completions: Some(PathBuf::from("/c")),
        })
    );
    // After `--` it is an operand, not the flag.
    assert_eq!(
        docs_request(&argv(&["testd", "--", "--generate-man", "/m"])),
        None
    );
}

#[test]
fn docs_flags_are_hidden_and_have_no_environment_variable() {
    let cmd = layered_command(
        Args::command(),
        &Sources::process("GCB_TESTD", Path::new(FILE)),
        FILE,
    );
    let help = cmd.clone().render_long_help().to_string();
    assert!(!help.contains("generate-man"), "{help}");
    assert!(!help.contains("GENERATE_MAN"), "{help}");
    assert!(!help.contains("completions"), "{help}");
    // Not even known to clap: only `docs_request` reads them.
    let e = World::new()
        .parse(&["--listen", "x", "--generate-man", "/m"])
        .unwrap_err();
    assert!(matches!(e, ConfError::Cli(_)), "{e}");
}

#[test]
fn write_docs_writes_man_pages_per_subcommand_and_completions() {
    #[derive(Parser, Debug)]
    #[command(name = "testd", version = "1.2")]
    struct WithSub {
        #[arg(long, default_value_t = 1024)]
        max_relays: usize,
        #[command(subcommand)]
        sub: Option<Sub>,
    }
    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        /// Ask the daemon.
        Status {
            #[arg(long)]
            json: bool,
        },
    }
    let dir = std::env::temp_dir().join(format!("gcb-conf-docs-{}", std::process::id()));
    let req = DocsRequest {
        man: Some(dir.join("man")),
        completions: Some(dir.join("completions")),
    };
    let cmd = layered_command(
        WithSub::command(),
        &Sources::process("GCB_TESTD", Path::new(FILE)),
        FILE,
    );
    let files = write_docs(cmd, "8", &["libgcb(7)"], &req).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(&dir).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "man/testd.8",
            "man/testd-status.8",
            "completions/testd",
            "completions/_testd"
        ]
    );
    let page = std::fs::read_to_string(dir.join("man/testd.8")).unwrap();
    assert!(
        page.starts_with(".ie") && page.contains(".TH testd 8"),
        "{page}"
    );
    assert!(page.contains("max\\-relays"), "{page}");
    assert!(page.contains("GCB_TESTD_MAX_RELAYS"), "{page}");
    assert!(
        page.ends_with(".SH \"SEE ALSO\"\n.BR libgcb (7)\n"),
        "{page}"
    );
    let sub = std::fs::read_to_string(dir.join("man/testd-status.8")).unwrap();
    assert!(sub.contains(".TH testd-status 8  \"testd 1.2\""), "{sub}");
    assert!(sub.contains(".BR testd (8),\n.BR libgcb (7)"), "{sub}");
    let bash = std::fs::read_to_string(dir.join("completions/testd")).unwrap();
    assert!(
        bash.contains("--max-relays") && bash.contains("status"),
        "{bash}"
    );
    assert!(!bash.contains("generate-man"), "{bash}");
    let zsh = std::fs::read_to_string(dir.join("completions/_testd")).unwrap();
    assert!(zsh.starts_with("#compdef testd"), "{zsh}");
    std::fs::remove_dir_all(&dir).unwrap();
}
