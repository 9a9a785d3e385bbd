//! Where a daemon's admin socket is: the default path of each daemon, and
//! `--admin-socket` as given (`none` turns it off).

use std::path::{Path, PathBuf};

/// The default admin socket path of daemon `name` (`brokerd`, `portfwd`):
/// `/run/gcb/NAME.sock` for root, else `$XDG_RUNTIME_DIR/gcb/NAME.sock`, else
/// `/tmp/gcb-UID/NAME.sock`.
pub fn default_admin_socket(name: &str) -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/gcb")
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("gcb")
    } else {
        PathBuf::from(format!("/tmp/gcb-{uid}"))
    };
    dir.join(format!("{name}.sock"))
}

/// `--admin-socket` as given: `none` turns the socket off, nothing means the default.
pub fn admin_socket_arg(given: Option<&Path>, name: &str) -> Option<PathBuf> {
    match given {
        Some(p) if p == Path::new("none") => None,
        Some(p) => Some(p.to_owned()),
        None => Some(default_admin_socket(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_and_none() {
        assert_eq!(admin_socket_arg(Some(Path::new("none")), "x"), None);
        assert_eq!(
            admin_socket_arg(Some(Path::new("/a/b.sock")), "x"),
            Some(PathBuf::from("/a/b.sock"))
        );
        assert!(
            default_admin_socket("brokerd").ends_with("gcb/brokerd.sock")
                || default_admin_socket("brokerd").ends_with("brokerd.sock")
        );
    }
}
