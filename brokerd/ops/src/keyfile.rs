//! The pool key file as both daemons read and write it: 64 hex characters (256 random
//! bits) and a newline, mode 0600. Reading warns once per read when the file is
//! readable by group or others (anyone who can read it can speak for the pool).

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gcb_proto::{KeyError, PoolKey};

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// It cannot be read.
    #[error("reading key file {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    /// Its contents are not a key.
    #[error("key file {0}: {1}")]
    Invalid(PathBuf, #[source] KeyError),
    /// It cannot be created or written.
    #[error("writing key file {0}: {1}")]
    Write(PathBuf, #[source] io::Error),
    /// No randomness for a new key.
    #[error("getrandom: {0}")]
    Random(String),
}

/// Reads the pool key from `path`, warning (tracing) when others can read the file.
pub fn load(path: &Path) -> Result<PoolKey, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|e| KeyFileError::Read(path.to_owned(), e))?;
    if let Some(why) = std::fs::metadata(path)
        .ok()
        .and_then(|m| gcb_proto::auth::loose_key_mode(m.permissions().mode()))
    {
        tracing::warn!("key file {} {}", path.display(), why);
    }
    PoolKey::from_file_contents(&bytes).map_err(|e| KeyFileError::Invalid(path.to_owned(), e))
}

/// Writes a fresh random pool key to `path`, mode 0600, never over an existing file, and
/// syncs it to disk.
pub fn generate(path: &Path) -> Result<(), KeyFileError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| KeyFileError::Random(e.to_string()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let werr = |e| KeyFileError::Write(path.to_owned(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    writeln!(f, "{hex}").map_err(werr)?;
    f.sync_all().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_loads_and_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("gcb-ops-keyfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.key");
        generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = load(&path).unwrap();
        assert!(matches!(generate(&path), Err(KeyFileError::Write(..))));
        assert!(load(&path).unwrap() == key, "the file is unchanged");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Invalid(..))));
        let missing = dir.join("none");
        let e = load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("reading key file {}: ", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
