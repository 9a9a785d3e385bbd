//! Issue #14, item 3: the man pages and shell completions `scripts/gen-docs` writes for the
//! package. The daemons' pages and completions are generated from their clap definitions
//! (the hidden `--generate-man` / `--generate-completions` of `gcb_proto::conf`), so this
//! checks that they list every flag `--help` shows, that every page renders without a
//! warning, and that the generating flags stay out of `--help`, the config file and the
//! environment. No lab: the built binaries, `man` and `gzip` only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gcb_lab::{artifact, repo_root};

/// Every file `scripts/gen-docs` writes, relative to its OUTDIR (the packager's interface).
const TREE: &[&str] = &[
    "completions/bash/gcb-brokerd",
    "completions/bash/gcb-dpf-request",
    "completions/bash/gcb-portfwd",
    "completions/bash/gcb-run",
    "completions/zsh/_gcb-brokerd",
    "completions/zsh/_gcb-dpf-request",
    "completions/zsh/_gcb-portfwd",
    "man/man1/gcb-dpf-request-delete.1.gz",
    "man/man1/gcb-dpf-request-forward.1.gz",
    "man/man1/gcb-dpf-request-query.1.gz",
    "man/man1/gcb-dpf-request.1.gz",
    "man/man1/gcb-run.1.gz",
    "man/man5/gcb-daemon-config.5.gz",
    "man/man5/gcb.conf.5.gz",
    "man/man7/libgcb.7.gz",
    "man/man8/gcb-brokerd-status.8.gz",
    "man/man8/gcb-brokerd.8.gz",
    "man/man8/gcb-portfwd-status.8.gz",
    "man/man8/gcb-portfwd.8.gz",
];

/// A fresh directory under the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("gcb-docs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The directory of the built binaries.
fn bin_dir() -> PathBuf {
    artifact("gcb-brokerd").parent().unwrap().to_path_buf()
}

/// Runs `scripts/gen-docs` into a fresh directory.
fn gen_docs(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    let out = run(Command::new(repo_root().join("scripts/gen-docs"))
        .arg(dir.0.join("out"))
        .env("GCB_BIN_DIR", bin_dir()));
    assert!(
        out.status.success(),
        "scripts/gen-docs failed: {}",
        text(&out.stderr)
    );
    dir
}

/// Every file under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// A gzipped man page's roff source, with roff's `\-` as `-`.
fn page_source(path: &Path) -> String {
    let out = run(Command::new("gzip").arg("-dc").arg(path));
    assert!(out.status.success(), "gzip -dc {}", path.display());
    text(&out.stdout).replace("\\-", "-")
}

/// The long flags `--help` of `bin ARGS` lists, from its option lines (not the
/// descriptions).
fn help_flags(bin: &Path, args: &[&str]) -> BTreeSet<String> {
    let out = run(Command::new(bin).args(args).arg("--help"));
    assert!(out.status.success(), "{} --help", bin.display());
    let help = text(&out.stdout);
    let flags: BTreeSet<String> = help
        .lines()
        .filter(|l| {
            let indent = l.len() - l.trim_start().len();
            indent > 0 && indent < 8 && l.trim_start().starts_with('-')
        })
        .filter_map(|l| {
            l.split([' ', ','])
                .find(|w| w.starts_with("--"))
                .map(|w| w.split(['=', '<']).next().unwrap().to_string())
        })
        .collect();
    assert!(
        flags.len() >= 3 && flags.contains("--help"),
        "too few flags found in --help:\n{help}"
    );
    flags
}

#[test]
fn gen_docs_writes_every_page_and_completion_and_every_page_renders_cleanly() {
    let dir = gen_docs("tree");
    let out = dir.0.join("out");
    let written = files_under(&out);
    let expected: BTreeSet<String> = TREE.iter().map(|s| s.to_string()).collect();
    assert_eq!(written, expected, "the tree scripts/gen-docs writes");
    for page in TREE.iter().filter(|p| p.starts_with("man/")) {
        let path = out.join(page);
        // `gzip -9n`: no name or timestamp in the header (reproducible, as Debian wants).
        let header = std::fs::read(&path).unwrap();
        assert_eq!(&header[..2], b"\x1f\x8b", "{page}: not gzip");
        assert_eq!(header[3] & 0x08, 0, "{page}: gzip header holds a file name");
        assert_eq!(
            &header[4..8],
            b"\0\0\0\0",
            "{page}: gzip header holds a time"
        );
        let out = run(Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(&path)
            .env("LC_ALL", "C.UTF-8")
            .env("MANROFFSEQ", "")
            .env("MANWIDTH", "80")
            .env_remove("MANPAGER")
            .env_remove("PAGER"));
        let shown = text(&out.stdout);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "man --warnings -l {page}: {}\n{}",
            out.status,
            text(&out.stderr)
        );
        assert!(
            shown.contains("NAME") && shown.contains("SEE ALSO") && shown.lines().count() > 15,
            "{page} rendered as:\n{shown}"
        );
    }
}

#[test]
fn daemon_pages_list_every_flag_of_their_help_and_its_environment_variable() {
    let dir = gen_docs("flags");
    let man8 = dir.0.join("out/man/man8");
    for (daemon, prefix) in [
        ("gcb-brokerd", "GCB_BROKERD"),
        ("gcb-portfwd", "GCB_PORTFWD"),
    ] {
        let bin = artifact(daemon);
        let page = page_source(&man8.join(format!("{daemon}.8.gz")));
        let flags = help_flags(&bin, &[]);
        for flag in &flags {
            assert!(
                page.contains(&format!("\\fB{flag}\\fR")),
                "{daemon}.8 does not document {flag} (--help lists it)"
            );
        }
        for must in ["--config", "--check-config", "--key-file", "--admin-socket"] {
            assert!(flags.contains(must), "{daemon} --help lacks {must}");
        }
        assert!(
            page.contains(&format!("{prefix}_ADMIN_SOCKET")),
            "{daemon}.8"
        );
        assert!(page.contains("GCB_KEY_FILE"), "{daemon}.8");
        assert!(
            page.contains(".TH gcb-") && page.contains(" 8 "),
            "{daemon}.8 section"
        );
        assert!(
            !page.contains("generate-man"),
            "{daemon}.8 shows a hidden flag"
        );
        let status = page_source(&man8.join(format!("{daemon}-status.8.gz")));
        for flag in help_flags(&bin, &["status"]) {
            assert!(
                status.contains(&format!("\\fB{flag}\\fR")),
                "{daemon}-status.8 does not document {flag} (status --help lists it)"
            );
        }
        assert!(
            page.contains(&format!("{daemon}-status(8)")),
            "{daemon}.8 names its status page"
        );
    }
    let dpf = page_source(&dir.0.join("out/man/man1/gcb-dpf-request.1.gz"));
    for flag in help_flags(&artifact("gcb-dpf-request"), &[]) {
        assert!(
            dpf.contains(&format!("\\fB{flag}\\fR")),
            "gcb-dpf-request.1: {flag}"
        );
    }
}

#[test]
fn completions_know_the_flags_and_the_status_subcommand() {
    let dir = gen_docs("completions");
    let comp = dir.0.join("out/completions");
    for daemon in ["gcb-brokerd", "gcb-portfwd"] {
        let bash = std::fs::read_to_string(comp.join("bash").join(daemon)).unwrap();
        for word in [
            "--config",
            "--check-config",
            "--admin-socket",
            "status",
            "--json",
        ] {
            assert!(
                bash.contains(word),
                "bash completion of {daemon} lacks {word}"
            );
        }
        assert!(
            bash.contains(&format!("-o default {daemon}\n")),
            "{daemon}: not a bash completion of {daemon}"
        );
        let zsh = std::fs::read_to_string(comp.join("zsh").join(format!("_{daemon}"))).unwrap();
        assert!(
            zsh.starts_with(&format!("#compdef {daemon}")),
            "_{daemon}: not a zsh completion"
        );
        assert!(
            zsh.contains("--config") && zsh.contains("--admin-socket"),
            "_{daemon}"
        );
        assert!(!bash.contains("generate-man") && !zsh.contains("generate-man"));
    }
    let bash = std::fs::read_to_string(comp.join("bash/gcb-brokerd")).unwrap();
    assert!(
        bash.contains("--max-relays"),
        "bash completion of gcb-brokerd"
    );
    // Every bash completion loads in bash and registers its command.
    for name in ["gcb-brokerd", "gcb-portfwd", "gcb-dpf-request", "gcb-run"] {
        let file = comp.join("bash").join(name);
        let out = run(Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p {name}", file.display())));
        assert!(
            out.status.success() && text(&out.stdout).contains(name),
            "bash: {name}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn generate_flags_are_hidden_and_never_a_config_key_or_environment_variable() {
    let dir = TempDir::new("hidden");
    for daemon in ["gcb-brokerd", "gcb-portfwd"] {
        let bin = artifact(daemon);
        let help = text(&run(Command::new(&bin).arg("--help")).stdout);
        assert!(help.contains("--check-config"), "{daemon} --help:\n{help}");
        assert!(
            !help.contains("generate-man") && !help.contains("generate-completions"),
            "{daemon} --help shows a hidden flag:\n{help}"
        );
        // A config key: one line naming file, line and key, exit status 1.
        let conf = dir.0.join(format!("{daemon}.toml"));
        std::fs::write(&conf, "# docs\ngenerate_man = \"/tmp/x\"\n").unwrap();
        let out = run(Command::new(&bin)
            .arg("--config")
            .arg(&conf)
            .arg("--check-config")
            .env_remove("GCB_KEY_FILE"));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{daemon}: {}",
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stderr),
            format!(
                "{daemon}: error: {}:2: unknown key `generate_man`\n",
                conf.display()
            )
        );
    }
    // An environment variable: ignored (the broker runs its check and writes nothing).
    let target = dir.0.join("from-env");
    let out = run(Command::new(artifact("gcb-brokerd"))
        .args(["--insecure", "--listen", "127.0.0.1:0", "--check-config"])
        .arg("--config")
        .arg("/dev/null")
        .env_remove("GCB_KEY_FILE")
        .env("GCB_BROKERD_GENERATE_MAN", &target)
        .env("GCB_BROKERD_GENERATE_COMPLETIONS", &target));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("configuration valid"));
    assert!(!text(&out.stdout).contains("generate_man"));
    assert!(
        !target.exists(),
        "an environment variable generated the docs"
    );
    // A directory that cannot be written: one error line, exit status 1.
    let out = run(Command::new(artifact("gcb-brokerd")).args(["--generate-man", "/proc/gcb-docs"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .starts_with("gcb-brokerd: error: writing the documentation to /proc/gcb-docs: "),
        "{}",
        text(&out.stderr)
    );
}
