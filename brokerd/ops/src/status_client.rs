//! The `status` command of a daemon (`gcb-brokerd status`, `gcb-portfwd status`): asks
//! the running daemon for its status document on its admin socket and prints it, as the
//! JSON text it answered (`--json`) or rendered by the daemon's own `render`.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// How long the command waits for the daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// `--admin-socket none`.
    #[error("--admin-socket none: no socket to ask")]
    NoSocket,
    /// No daemon answers on the socket.
    #[error("no gcb-{daemon} answers on its admin socket {path} ({cause}); is it running, with this --admin-socket?")]
    NotRunning {
        /// The daemon's short name (`brokerd`, `portfwd`).
        daemon: &'static str,
        /// The socket path.
        path: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The daemon answered something else than a status document.
    #[error("{path}: unexpected answer: {detail}")]
    BadAnswer {
        /// The socket path.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

// `gcb-brokerd status` / `gcb-portfwd status`: the arguments. `--admin-socket` also comes
// from the daemon's config file and environment (`gcb_proto::conf::parse_subcommand`), so
// the command finds a socket the configuration moved. (The doc comment is the --help.)
/// Prints what the running daemon serves and its counters, from its admin socket.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the status document as JSON (schema: the daemon's `status` module docs).
    #[arg(long)]
    pub json: bool,

    /// The daemon's admin socket (default: as the daemon's configuration says, else the
    /// daemon's default).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<std::path::PathBuf>,
}

/// `gcb-DAEMON status`: asks the daemon `daemon` (`brokerd`, `portfwd`) on its admin
/// socket (`--admin-socket` as given: [`crate::admin_path::admin_socket_arg`]) and prints the answer
/// to stdout, as is if `json`, else as `render` makes it.
pub fn status_command<T: DeserializeOwned>(
    daemon: &'static str,
    admin_socket: Option<&Path>,
    json: bool,
    render: fn(&T) -> String,
) -> Result<(), StatusError> {
    let path =
        crate::admin_path::admin_socket_arg(admin_socket, daemon).ok_or(StatusError::NoSocket)?;
    let (text, doc) = fetch::<T>(daemon, &path)?;
    if json {
        print!("{text}");
    } else {
        print!("{}", render(&doc));
    }
    Ok(())
}

/// Asks the daemon `daemon` at `path` for its status: the raw JSON text and the document.
pub fn fetch<T: DeserializeOwned>(
    daemon: &'static str,
    path: &Path,
) -> Result<(String, T), StatusError> {
    let text = request(daemon, path, "status")?;
    let doc = serde_json::from_str(&text).map_err(|e| StatusError::BadAnswer {
        path: path.display().to_string(),
        detail: format!("{e}: {}", text.lines().next().unwrap_or("")),
    })?;
    Ok((text, doc))
}

/// Sends one request line to the admin socket of `daemon` at `path` and reads the whole
/// answer.
pub fn request(daemon: &'static str, path: &Path, line: &str) -> Result<String, StatusError> {
    let shown = path.display().to_string();
    let not_running = |cause| StatusError::NotRunning {
        daemon,
        path: shown.clone(),
        cause,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(not_running)?;
    let bad = |e: std::io::Error| StatusError::BadAnswer {
        path: shown.clone(),
        detail: e.to_string(),
    };
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(bad)?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(bad)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(bad)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_daemon_and_the_socket() {
        let path = std::env::temp_dir().join(format!("gcb-ops-nobody-{}.sock", std::process::id()));
        let e = fetch::<serde_json::Value>("portfwd", &path).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("no gcb-portfwd answers on its admin socket "),
            "{text}"
        );
        assert!(text.contains(&path.display().to_string()), "{text}");
        let e =
            status_command::<serde_json::Value>("brokerd", Some(Path::new("none")), true, |_| {
                String::new()
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "--admin-socket none: no socket to ask");
    }

    #[test]
    fn an_answer_that_is_not_json_is_a_bad_answer() {
        let dir = std::env::temp_dir().join(format!("gcb-ops-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junk.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = [0u8; 7];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"status\n");
            s.write_all(b"error: nope\nmore\n").unwrap();
        });
        let e = fetch::<serde_json::Value>("brokerd", &path).unwrap_err();
        server.join().unwrap();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{}: unexpected answer: ", path.display())),
            "{text}"
        );
        assert!(text.ends_with(": error: nope"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Why `gcb-DAEMON status` could not run.
#[derive(Debug, thiserror::Error)]
pub enum StatusCommandError {
    /// The configuration (file, environment) is wrong.
    #[error(transparent)]
    Conf(#[from] gcb_proto::conf::ConfError),
    /// The daemon could not be asked.
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// `gcb-DAEMON status ...` as a daemon's `main` runs it: this process's arguments, with
/// `--admin-socket` also from the daemon `P`'s config layers (`env_prefix`,
/// `default_file`: see `gcb_proto::conf::parse_subcommand`), then [`status_command`].
/// `--help` and command-line errors print and exit here, as clap does.
pub fn run<P: clap::CommandFactory, T: DeserializeOwned>(
    daemon: &'static str,
    env_prefix: &str,
    default_file: &Path,
    render: fn(&T) -> String,
) -> Result<(), StatusCommandError> {
    use gcb_proto::conf::{self, ConfError, Sources};
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let sources = Sources::process(env_prefix, default_file);
    let args = match conf::parse_subcommand::<P, StatusArgs>("status", argv, &sources) {
        Err(ConfError::Cli(e)) => e.exit(),
        r => r?,
    };
    status_command(daemon, args.admin_socket.as_deref(), args.json, render)?;
    Ok(())
}
