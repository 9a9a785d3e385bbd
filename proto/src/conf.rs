//! The daemons' configuration layers: a TOML file, `GCB_*` environment variables and the
//! command line, in that order of precedence (later wins), over one clap definition.
//!
//! The daemons define their settings once, as clap flags. This module makes every long
//! flag also
//!
//! - a key of the config file, spelled like the flag with `-` or `_`
//!   (`max-relays = 2048` or `max_relays = 2048`), and
//! - an environment variable `PREFIX_FLAG` (`GCB_BROKERD_MAX_RELAYS=2048`), unless the flag
//!   already names one (`--key-file` reads `GCB_KEY_FILE`, shared with the shim).
//!
//! so a flag added to a daemon is configurable everywhere with no further code, and the
//! file can never accept a key that the command line does not (or the reverse). Two flags
//! are added to every daemon here: `--config PATH` (default: the daemon's file under
//! `/etc/gcb/`, used only if it exists) and `--check-config`.
//!
//! How the layers combine: each file entry becomes `--flag=value` placed before the real
//! arguments, and the command is parsed with clap's `args_override_self`, so a flag given
//! on the command line replaces the file's value (a repeatable flag given on the command
//! line replaces the file's whole list). An entry whose environment variable is set is
//! left out, so the environment beats the file. Every entry is checked against its flag's
//! own value parser first, so a bad value is reported at its file and line.
//!
//! The file is TOML without tables: `key = value` lines, strings, integers, floats,
//! booleans (a flag that takes no value: `insecure = true`) and arrays for repeatable
//! flags (`allow = ["10.0.0.0/8", "192.168.1.7"]`). Unknown keys are errors that name the
//! file, the line and the key, with the closest known key.
//!
//! Sans-IO like the rest of this crate: the file reader and the environment come in as
//! functions ([`Sources`]), so the whole layering is unit-tested without touching either.
//!
//! The documentation comes from the same definition. Two hidden flags, command line only
//! (never a file key, no environment variable, not in `--help`), write it and exit 0:
//! `--generate-man DIR` writes roff man pages `NAME.SECTION` (the daemons' section 8,
//! one page per subcommand too, as `NAME-SUB.SECTION`) and `--generate-completions DIR`
//! writes the bash (`DIR/NAME`) and zsh (`DIR/_NAME`) completions. They are seen before
//! anything else is parsed ([`docs_request`]), so a daemon needs no code for them; a
//! daemon's `status` subcommand is known only to [`parse_subcommand`], so
//! `gcb-brokerd status --generate-man DIR` writes the daemon's page and the status
//! command's (`gcb-brokerd-status.8`), and completions that include `status`. Plain clap
//! tools call [`exit_if_docs_requested`]. This is the one place the module writes files.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};

/// Where the layers come from: the daemon's identity and the process's environment and
/// file system, injected.
pub struct Sources<'a> {
    /// Prefix of the generated environment variables, e.g. `GCB_BROKERD`.
    pub env_prefix: &'a str,
    /// The config file read when `--config` is not given; a missing one is not an error.
    pub default_file: &'a Path,
    /// Reads a config file.
    pub read_file: &'a dyn Fn(&Path) -> std::io::Result<String>,
    /// Looks up an environment variable.
    pub env: &'a dyn Fn(&str) -> Option<OsString>,
}

/// The parsed settings, with where each came from.
#[derive(Debug)]
pub struct Layered<T> {
    /// The daemon's arguments, all layers applied.
    pub args: T,
    /// `--check-config` was given: validate, print [`Layered::effective`], exit.
    pub check_config: bool,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    /// The file read when none is named (for the report).
    default_file: PathBuf,
    /// The final matches (for [`Layered::effective`]).
    matches: ArgMatches,
    /// Flag id -> `FILE:LINE` or `environment VAR` of the values from those layers.
    from_file: BTreeMap<String, String>,
    /// The command, for the flags' names and environment variables.
    command: Command,
}

/// A configuration that cannot be used. The messages name the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    /// The file cannot be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// A key no flag has.
    #[error("{path}:{line}: unknown key `{key}`{hint}")]
    UnknownKey {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The key as written.
        key: String,
        /// ` (did you mean ...?)` or empty.
        hint: String,
    },
    /// A known key with a value its flag refuses.
    #[error("{path}:{line}: {key}: {why}")]
    BadValue {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The key as written.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// An environment variable with a value its flag refuses.
    #[error("environment {var}: {why}")]
    BadEnv {
        /// The variable.
        var: String,
        /// What is wrong.
        why: String,
    },
    /// `--generate-man` or `--generate-completions` could not write its files.
    #[error("writing the documentation to {dir}: {source}")]
    Docs {
        /// The directory asked for.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command line is wrong, or asks for --help/--version:
    /// the caller lets clap print it and exit (`e.exit()`).
    #[error(transparent)]
    Cli(#[from] clap::Error),
}

/// Flags that only make sense on a command line, never in a file.
const NOT_IN_FILE: &[&str] = &[
    "help",
    "version",
    "config",
    "check-config",
    "generate-key",
    GENERATE_MAN,
    GENERATE_COMPLETIONS,
];

/// The hidden flag that writes the man pages to a directory and exits.
const GENERATE_MAN: &str = "generate-man";
/// The hidden flag that writes the bash and zsh completions to a directory and exits.
const GENERATE_COMPLETIONS: &str = "generate-completions";

/// The man page section of the daemons (system administration, daemons).
const DAEMON_SECTION: &str = "8";
/// The pages every daemon page points to: the config files and the environment.
const DAEMON_SEE_ALSO: &[&str] = &["gcb-daemon-config(5)", "libgcb(7)", "gcb-run(1)"];

/// Adds `--config`, `--check-config` and the generated environment variables to `cmd`.
fn layered_command(cmd: Command, sources: &Sources<'_>, default_file: &str) -> Command {
    let prefix = sources.env_prefix.to_string();
    let prefix_config = prefix.clone();
    let cmd = cmd
        .args_override_self(true)
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .env(format!("{prefix_config}_CONFIG"))
                .global(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help(format!(
                    "Configuration file (TOML, `flag-name = value` for any flag below; the \
                     command line and environment variables override it). Default: \
                     {default_file} if it exists"
                )),
        )
        .arg(
            Arg::new("check-config")
                .long("check-config")
                .action(ArgAction::SetTrue)
                .help(
                    "Validate the configuration (file, environment, command line), print the \
                     effective settings with where each came from, and exit",
                ),
        )
        .mut_args(|a| with_env(a, &prefix));
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    subcommands.iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |sub| sub.mut_args(|a| with_env(a, &prefix)))
    })
}

/// `arg` with the environment variable `PREFIX_FLAG`, unless it names one already or is
/// command-line only.
fn with_env(arg: Arg, prefix: &str) -> Arg {
    if arg.get_env().is_some() || arg.is_positional() {
        return arg;
    }
    match arg.get_long() {
        Some(long) if !NOT_IN_FILE.contains(&long) => {
            let var = format!("{prefix}_{}", long.to_uppercase().replace('-', "_"));
            arg.env(var)
        }
        _ => arg,
    }
}

/// The subcommand `argv` runs (`gcb-brokerd status ...`), with its position in `argv`: the
/// first word that is neither a flag nor a flag's value.
fn subcommand_in<'c>(cmd: &'c Command, argv: &[OsString]) -> Option<(usize, &'c Command)> {
    let mut i = 1;
    while i < argv.len() {
        let word = argv[i].to_string_lossy();
        if word == "--" {
            return None;
        }
        if let Some(long) = word.strip_prefix("--") {
            let takes = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .is_some_and(takes_value);
            i += if takes { 2 } else { 1 };
            continue;
        }
        if word.starts_with('-') {
            i += 1;
            continue;
        }
        return cmd.find_subcommand(&*word).map(|s| (i, s));
    }
    None
}

/// The value of `--config` on the command line (`--config F` or `--config=F`), if any.
fn config_flag(argv: &[OsString]) -> Option<PathBuf> {
    flag_value(argv, "config")
}

/// The value of the flag `--long` on the command line (`--long V` or `--long=V`), if any.
fn flag_value(argv: &[OsString], long: &str) -> Option<PathBuf> {
    let flag = format!("--{long}");
    let with_value = format!("--{long}=");
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == flag {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix(&with_value) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// What the hidden documentation flags ask for: where to write the man pages and the
/// completions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DocsRequest {
    /// `--generate-man DIR`.
    pub man: Option<PathBuf>,
    /// `--generate-completions DIR`.
    pub completions: Option<PathBuf>,
}

/// The documentation `argv` asks for (`--generate-man DIR`, `--generate-completions DIR`),
/// if any: looked for before the command line is parsed, so they work whatever else is
/// given or required.
pub fn docs_request(argv: &[OsString]) -> Option<DocsRequest> {
    let req = DocsRequest {
        man: flag_value(argv, GENERATE_MAN),
        completions: flag_value(argv, GENERATE_COMPLETIONS),
    };
    (req != DocsRequest::default()).then_some(req)
}

/// Writes the documentation `req` asks for of `cmd`: the man pages (section `section`,
/// each with a SEE ALSO section naming `see_also`, e.g. `libgcb(7)`, and its parent's
/// page for a subcommand's) and the bash and zsh completions. Returns the files written.
pub fn write_docs(
    cmd: Command,
    section: &str,
    see_also: &[&str],
    req: &DocsRequest,
) -> Result<Vec<PathBuf>, ConfError> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    if let Some(dir) = &req.man {
        let io = |source| ConfError::Docs {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // The program and its version, in every page's footer (a subcommand has none).
        let source = format!(
            "{} {}",
            cmd.get_name(),
            cmd.get_version().unwrap_or_default()
        );
        let pages = ManPages {
            section,
            source: source.trim_end(),
            dir,
        };
        pages.write(&cmd, see_also, &mut written).map_err(io)?;
    }
    if let Some(dir) = &req.completions {
        let io = |source| ConfError::Docs {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let name = cmd.get_name().to_string();
        for (shell, file) in [
            (clap_complete::Shell::Bash, name.clone()),
            (clap_complete::Shell::Zsh, format!("_{name}")),
        ] {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut text);
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(io)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Where and how [`write_docs`] writes man pages.
struct ManPages<'a> {
    /// The section, e.g. `8`.
    section: &'a str,
    /// The footer: program and version.
    source: &'a str,
    /// The directory.
    dir: &'a Path,
}

impl ManPages<'_> {
    /// The page of `cmd` and of each visible subcommand (`NAME-SUB.SECTION`).
    fn write(
        &self,
        cmd: &Command,
        see_also: &[&str],
        written: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone())
            .section(self.section)
            .source(self.source);
        let mut page = Vec::new();
        man.render(&mut page)?;
        page.extend_from_slice(b".SH \"SEE ALSO\"\n");
        let lines: Vec<String> = see_also.iter().map(|p| see_also_line(p)).collect();
        page.extend_from_slice(lines.join(",\n").as_bytes());
        page.push(b'\n');
        let path = self.dir.join(man.get_filename());
        std::fs::write(&path, page)?;
        written.push(path);
        let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
        let parent = format!("{name}({})", self.section);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut pages = vec![parent.as_str()];
            pages.extend_from_slice(see_also);
            self.write(sub, &pages, written)?;
        }
        Ok(())
    }
}

/// `NAME(S)` as a roff cross reference: `.BR NAME (S)`.
fn see_also_line(page: &str) -> String {
    match page.split_once('(') {
        Some((name, rest)) => format!(".BR {name} ({rest}"),
        None => format!(".B {page}"),
    }
}

/// For a program with a plain clap command line (not layered): when `argv` has
/// `--generate-man DIR` or `--generate-completions DIR`, writes `T`'s documentation
/// (man section `section`, SEE ALSO `see_also`) and exits 0, saying what it wrote;
/// returns only when neither is given, or with the error that kept the files from being
/// written.
pub fn exit_if_docs_requested<T: clap::CommandFactory>(
    argv: &[OsString],
    section: &str,
    see_also: &[&str],
) -> Result<(), ConfError> {
    match docs_request(argv) {
        Some(req) => Err(write_docs_and_exit(T::command(), section, see_also, &req)),
        None => Ok(()),
    }
}

/// [`write_docs`], then exit 0 with the files written on stdout; returns the error if it
/// could not write them.
fn write_docs_and_exit(
    cmd: Command,
    section: &str,
    see_also: &[&str],
    req: &DocsRequest,
) -> ConfError {
    match write_docs(cmd, section, see_also, req) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            std::process::exit(0)
        }
        Err(e) => e,
    }
}

/// Whether the command line names the flag `long` (or one of `shorts`).
fn on_command_line(argv: &[OsString], long: &str, short: Option<char>) -> bool {
    let flag = format!("--{long}");
    let with_value = format!("--{long}=");
    argv.iter().skip(1).any(|a| {
        let s = a.to_string_lossy();
        s == flag
            || s.starts_with(&with_value)
            || short.is_some_and(|c| s.len() >= 2 && s.starts_with('-') && s[1..].starts_with(c))
    })
}

/// [`parse`] of `argv` (this process's arguments) with this process's environment and
/// files: the daemons' `main`, at start and on every reload.
/// (The one place this crate reads anything itself; everything it calls takes them as
/// arguments.)
///
/// With `--generate-man DIR` or `--generate-completions DIR` it writes the daemon's
/// documentation instead (module docs) and exits 0.
pub fn parse_process<T: clap::CommandFactory + FromArgMatches>(
    argv: &[OsString],
    env_prefix: &str,
    default_file: &Path,
) -> Result<Layered<T>, ConfError> {
    let sources = Sources::process(env_prefix, default_file);
    if let Some(req) = docs_request(argv) {
        let cmd = layered_command(T::command(), &sources, &default_file.display().to_string());
        return Err(write_docs_and_exit(
            cmd,
            DAEMON_SECTION,
            DAEMON_SEE_ALSO,
            &req,
        ));
    }
    parse(argv.to_vec(), &sources)
}

impl<'a> Sources<'a> {
    /// This process's environment and file system.
    pub fn process(env_prefix: &'a str, default_file: &'a Path) -> Sources<'a> {
        fn read(p: &Path) -> std::io::Result<String> {
            std::fs::read_to_string(p)
        }
        fn env(k: &str) -> Option<OsString> {
            std::env::var_os(k)
        }
        Sources {
            env_prefix,
            default_file,
            read_file: &read,
            env: &env,
        }
    }
}

/// Parses `argv` with the file and environment layers under it.
pub fn parse<T: clap::CommandFactory + FromArgMatches>(
    argv: Vec<OsString>,
    sources: &Sources<'_>,
) -> Result<Layered<T>, ConfError> {
    let (matches, file, from_file, command) = parse_command(T::command(), argv, sources)?;
    let args = T::from_arg_matches(&matches)?;
    Ok(Layered {
        args,
        check_config: matches.get_flag("check-config"),
        file,
        default_file: sources.default_file.to_path_buf(),
        matches,
        from_file,
        command,
    })
}

/// A subcommand's arguments `S` (`gcb-brokerd status ...`, `argv` starting with the
/// program and `name`) with the daemon `P`'s layers under them: the file's and the
/// environment's values of the flags `S` shares with `P` (the admin socket's path), and
/// `P`'s other keys ignored, as [`parse`] does for a subcommand. `P`'s required flags
/// are not required here.
///
/// With `--generate-man DIR` or `--generate-completions DIR` it writes the documentation
/// of the whole command line, the daemon's and the subcommand's (module docs), and
/// exits 0.
pub fn parse_subcommand<P: clap::CommandFactory, S: clap::Args + FromArgMatches>(
    name: &'static str,
    argv: Vec<OsString>,
    sources: &Sources<'_>,
) -> Result<S, ConfError> {
    let daemon = P::command()
        .subcommand(S::augment_args(Command::new(name)))
        .subcommand_negates_reqs(true)
        .args_conflicts_with_subcommands(true);
    if let Some(req) = docs_request(&argv) {
        let default_file = sources.default_file.display().to_string();
        let cmd = layered_command(daemon, sources, &default_file);
        return Err(write_docs_and_exit(
            cmd,
            DAEMON_SECTION,
            DAEMON_SEE_ALSO,
            &req,
        ));
    }
    let (matches, ..) = parse_command(daemon, argv, sources)?;
    let sub = matches.subcommand_matches(name).ok_or_else(|| {
        clap::Error::raw(
            clap::error::ErrorKind::MissingSubcommand,
            format!("expected the `{name}` subcommand"),
        )
    })?;
    Ok(S::from_arg_matches(sub)?)
}

/// What [`parse_command`] returns: the matches, the file read, where each layered value
/// came from, and the command with the layers' flags.
type Parsed = (
    ArgMatches,
    Option<PathBuf>,
    BTreeMap<String, String>,
    Command,
);

/// [`parse`]'s work on a clap command.
fn parse_command(
    command: Command,
    argv: Vec<OsString>,
    sources: &Sources<'_>,
) -> Result<Parsed, ConfError> {
    let default_file = sources.default_file.display().to_string();
    let command = layered_command(command, sources, &default_file);
    // The file named by --config, else the environment's, else the default if it exists.
    let env_config = (sources.env)(&format!("{}_CONFIG", sources.env_prefix)).map(PathBuf::from);
    let (path, explicit) = match config_flag(&argv).or(env_config) {
        Some(p) => (p, true),
        None => (sources.default_file.to_path_buf(), false),
    };
    let text = match (sources.read_file)(&path) {
        Ok(t) => Some(t),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ConfError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    // A subcommand (`status`) takes the file's keys it knows and ignores the daemon's
    // other settings; the layers' flags go right after its name.
    let sub = subcommand_in(&command, &argv);
    let target = sub.map_or(&command, |(_, s)| s);
    let mut injected: Vec<OsString> = Vec::new();
    let mut from_file = BTreeMap::new();
    if let Some(text) = &text {
        let name = path.display().to_string();
        for entry in entries(&name, text)? {
            let bad = |why: String| ConfError::BadValue {
                path: name.clone(),
                line: entry.line,
                key: entry.key.clone(),
                why,
            };
            if entry.value.is_table() {
                return Err(bad(
                    "sections are not used in this file: write `key = value` lines only"
                        .to_string(),
                ));
            }
            let Some(arg) = find_flag(target, &entry.key) else {
                if sub.is_some() && find_flag(&command, &entry.key).is_some() {
                    continue;
                }
                return Err(ConfError::UnknownKey {
                    hint: hint(&command, &entry.key),
                    path: name,
                    line: entry.line,
                    key: entry.key,
                });
            };
            let long = arg.get_long().unwrap_or_default();
            if on_command_line(&argv, long, arg.get_short()) || env_value(arg, sources).is_some() {
                continue;
            }
            let flags = entry_flags(arg, &entry.value).map_err(bad)?;
            check_values(arg, &flags).map_err(bad)?;
            from_file.insert(arg.get_id().to_string(), format!("{name}:{}", entry.line));
            injected.extend(flags);
        }
    }
    // The environment, over the file. clap could read it itself, but then the process's
    // real environment would be read behind the caller's back (and `Sources::env` would
    // be a lie in tests); clap's `env` on each flag still documents it in --help.
    let mut from_env = BTreeMap::new();
    for arg in target.get_arguments() {
        let Some((var, value)) = env_value(arg, sources) else {
            continue;
        };
        let long = arg.get_long().unwrap_or_default();
        if on_command_line(&argv, long, arg.get_short()) {
            continue;
        }
        let bad = |why: String| ConfError::BadEnv {
            var: var.clone(),
            why,
        };
        let value = value
            .into_string()
            .map_err(|_| bad("not UTF-8".to_string()))?;
        let value = env_as_toml(arg, &value).map_err(bad)?;
        let flags = entry_flags(arg, &value).map_err(bad)?;
        check_values(arg, &flags).map_err(bad)?;
        from_env.insert(arg.get_id().to_string(), format!("environment {var}"));
        injected.extend(flags);
    }
    let at = sub.map_or(1, |(i, _)| i + 1);
    let mut full = Vec::with_capacity(argv.len() + injected.len());
    let mut it = argv.into_iter();
    full.extend(it.by_ref().take(at));
    full.extend(injected);
    full.extend(it);
    let matches = command.clone().try_get_matches_from(full)?;
    let sources_used = from_file.into_iter().chain(from_env).collect();
    Ok((
        matches,
        text.is_some().then_some(path),
        sources_used,
        command,
    ))
}

/// The flag's environment variable and its value, if set.
fn env_value(arg: &Arg, sources: &Sources<'_>) -> Option<(String, OsString)> {
    let var = arg.get_env()?.to_string_lossy().into_owned();
    let value = (sources.env)(&var)?;
    Some((var, value))
}

/// An environment value as the file would hold it: a flag without a value takes
/// `1/true/yes/on` or `0/false/no/off/` (empty), a repeatable one a comma-separated list.
fn env_as_toml(arg: &Arg, value: &str) -> Result<toml::Value, String> {
    if !takes_value(arg) {
        return match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "" | "0" | "false" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("expected true or false, not `{value}`")),
        };
    }
    if matches!(arg.get_action(), ArgAction::Append) {
        let items = value
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| toml::Value::String(v.to_string()))
            .collect();
        return Ok(toml::Value::Array(items));
    }
    Ok(toml::Value::String(value.to_string()))
}

/// Whether the flag takes a value (not a switch).
fn takes_value(arg: &Arg) -> bool {
    arg.get_num_args().is_none_or(|n| n.takes_values())
        && !matches!(
            arg.get_action(),
            ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
        )
}

/// One `key = value` of the file.
struct Entry {
    key: String,
    line: usize,
    value: toml::Value,
}

/// The file's entries, in file order.
fn entries(path: &str, text: &str) -> Result<Vec<Entry>, ConfError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| ConfError::Syntax {
            path: path.to_string(),
            line: e.span().map_or(1, |s| line_of(s.start)),
            message: e.message().trim().to_string(),
        })?;
    let mut out: Vec<Entry> = table
        .into_iter()
        .map(|(k, v)| Entry {
            line: line_of(k.span().start),
            key: k.into_inner(),
            value: v.into_inner(),
        })
        .collect();
    out.sort_by_key(|e| e.line);
    Ok(out)
}

/// The flag a file key names (`max_relays` or `max-relays`), if it may be set in a file.
fn find_flag<'c>(cmd: &'c Command, key: &str) -> Option<&'c Arg> {
    let long = key.replace('_', "-");
    if NOT_IN_FILE.contains(&long.as_str()) {
        return None;
    }
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
}

/// ` (did you mean `x`?)` for the known key closest to `key`, if one is close.
fn hint(cmd: &Command, key: &str) -> String {
    let key = key.replace('-', "_");
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_IN_FILE.contains(l))
        .map(|l| l.replace('-', "_"))
        .map(|l| (edit_distance(&key, &l), l))
        .filter(|(d, l)| *d <= 2.max(l.len() / 4))
        .min()
        .map(|(_, l)| format!(" (did you mean `{l}`?)"))
        .unwrap_or_default()
}

/// Levenshtein distance, for the hint.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The command-line words standing for one file (or environment) value.
fn entry_flags(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().unwrap_or_default();
    let takes_value = takes_value(arg);
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            other => Err(format!(
                "expected a string or number, not {}",
                other.type_str()
            )),
        }
    };
    if !takes_value {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{long}").into()]),
            toml::Value::Boolean(false) => Ok(vec![]),
            other => Err(format!("expected true or false, not {}", other.type_str())),
        };
    }
    match value {
        toml::Value::Array(items) => {
            if !matches!(arg.get_action(), ArgAction::Append) {
                return Err("takes one value, not a list".to_string());
            }
            items
                .iter()
                .map(|v| scalar(v).map(|s| format!("--{long}={s}").into()))
                .collect()
        }
        v => Ok(vec![format!("--{long}={}", scalar(v)?).into()]),
    }
}

/// Runs the flag's own value parser on each value, so a bad value is reported with its
/// file and line rather than as a command-line error.
fn check_values(arg: &Arg, flags: &[OsString]) -> Result<(), String> {
    // A lone copy of the flag: the real one may refer to others (required_unless...).
    let mut lone = Arg::new(arg.get_id().clone())
        .long(arg.get_long().unwrap_or_default().to_string())
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone());
    if let Some(names) = arg.get_value_names() {
        lone = lone.value_names(names.to_vec());
    }
    for flag in flags {
        let probe = Command::new("config")
            .no_binary_name(true)
            .arg(lone.clone());
        if let Err(e) = probe.try_get_matches_from([flag]) {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            return Err(first.trim_start_matches("error: ").to_string());
        }
    }
    Ok(())
}

impl<T> Layered<T> {
    /// `--check-config`'s output for daemon `name`: a header saying which file was read,
    /// then [`Layered::effective`].
    pub fn check_report(&self, name: &str) -> String {
        let head = match &self.file {
            Some(f) => format!("# {name}: configuration valid; file {}\n", f.display()),
            None => format!(
                "# {name}: configuration valid; no file ({} absent)\n",
                self.default_file.display()
            ),
        };
        head + &self.effective()
    }

    /// The effective settings as a config file: every flag with its value and, in a
    /// comment, where the value came from (default, file and line, environment variable,
    /// command line). Flags without a value are listed commented out.
    pub fn effective(&self) -> String {
        let mut out = String::new();
        for arg in self.command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if NOT_IN_FILE.contains(&long) {
                continue;
            }
            let id = arg.get_id().as_str();
            let key = long.replace('-', "_");
            let values: Vec<String> = self
                .matches
                .get_raw(id)
                .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let source = match self.matches.value_source(id) {
                Some(ValueSource::DefaultValue) => "default".to_string(),
                Some(ValueSource::EnvVariable) => "environment".to_string(),
                Some(ValueSource::CommandLine) => match self.from_file.get(id) {
                    Some(at) => at.clone(),
                    None => "command line".to_string(),
                },
                _ => String::new(),
            };
            let value = if !takes_value(arg) {
                Some(self.matches.get_flag(id).to_string())
            } else if values.is_empty() {
                None
            } else if matches!(arg.get_action(), ArgAction::Append) {
                Some(format!(
                    "[{}]",
                    values
                        .iter()
                        .map(|v| toml_scalar(v))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            } else {
                Some(toml_scalar(&values[0]))
            };
            let _ = match value {
                Some(v) if source.is_empty() => writeln!(out, "{key} = {v}"),
                Some(v) => writeln!(out, "{key} = {v}  # {source}"),
                None => writeln!(out, "# {key} = (not set)"),
            };
        }
        out
    }
}

/// A value as TOML: numbers and booleans bare, anything else a quoted string.
fn toml_scalar(v: &str) -> String {
    let bare = v == "true"
        || v == "false"
        || v.parse::<i64>().is_ok()
        || (v.parse::<f64>().is_ok() && v.chars().all(|c| c.is_ascii_digit() || c == '.'));
    if bare {
        v.to_string()
    } else {
        toml::Value::String(v.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests;
