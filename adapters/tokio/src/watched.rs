//! Files that are re-read when they change: rotated tokens (ServiceAccount tokens, Kubernetes
//! Secrets mounted as files, `--token-file`), token tables and renewed certificates.
//!
//! A [`Watched`] file is parsed once when opened and again whenever its modification time, size
//! or inode differs from the last read (checked with one `stat` per [`Watched::get`], cheap
//! enough for every dial, handshake or request). A change that does not parse keeps the last good
//! value in force and is reported once, so a half-written file never locks anyone out.
//! Contents never appear in errors or logs: they hold secrets.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

/// The parser of a watched file: its bytes to a value, or one line saying what is wrong (never
/// quoting the contents).
pub type Parse<T> = fn(&[u8]) -> Result<T, String>;

struct Cache<T> {
    /// The version last looked at (parsed or not).
    seen: Option<Stamp>,
    /// The last value that parsed.
    good: Option<Arc<T>>,
}

/// A file re-read when it changes; see the [module docs](self).
pub struct Watched<T> {
    path: PathBuf,
    parse: Parse<T>,
    cache: Mutex<Cache<T>>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<T> Watched<T> {
    /// Reads and parses `path` once, so a bad file fails at start-up.
    ///
    /// # Errors
    /// One line naming the file and what is wrong.
    pub fn open(path: &Path, parse: Parse<T>) -> Result<Self, String> {
        let watched = Self {
            path: path.to_path_buf(),
            parse,
            cache: Mutex::new(Cache {
                seen: None,
                good: None,
            }),
        };
        watched.get()?;
        Ok(watched)
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current value: the cached one unless the file changed since it was read. A changed
    /// file that cannot be read or parsed keeps the last good value (logged once per change);
    /// without one, that is the error.
    ///
    /// # Errors
    /// One line naming the file, when no version of it ever parsed.
    pub fn get(&self) -> Result<Arc<T>, String> {
        let stamp = std::fs::metadata(&self.path).map(|m| Stamp {
            modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: m.len(),
            inode: m.ino(),
        });
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = match &stamp {
            Ok(stamp) if cache.seen == Some(*stamp) => None,
            Ok(stamp) => Some(Some(*stamp)),
            Err(_) => Some(None),
        };
        if let Some(seen) = fresh {
            let parsed = stamp
                .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
                .and_then(|_| {
                    std::fs::read(&self.path)
                        .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
                })
                .and_then(|bytes| {
                    (self.parse)(&bytes).map_err(|e| format!("{}: {e}", self.path.display()))
                });
            cache.seen = seen;
            match parsed {
                Ok(value) => {
                    if cache.good.is_some() {
                        tracing::info!(file = %self.path.display(), "re-read after a change");
                    }
                    cache.good = Some(Arc::new(value));
                }
                Err(e) if cache.good.is_some() => {
                    tracing::warn!("{e}; keeping the previous version");
                }
                Err(e) => return Err(e),
            }
        }
        cache
            .good
            .clone()
            .ok_or_else(|| format!("{} has never been readable", self.path.display()))
    }
}

/// A file holding one token (surrounding white space ignored).
pub fn parse_token(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the token is not UTF-8".to_string())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("the token file is empty".into());
    }
    if token.chars().any(|c| c.is_control() || c == ' ') {
        return Err("the token contains spaces or control characters".into());
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        // A new file each time (as Kubernetes swaps a Secret's files): a new inode.
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_token_file_is_reread_when_it_changes_and_a_bad_change_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write(&path, "first\n");
        let watched = Watched::open(&path, parse_token).unwrap();
        assert_eq!(*watched.get().unwrap(), "first");
        write(&path, "second");
        assert_eq!(*watched.get().unwrap(), "second");
        // Emptied (half-written, say): the last good one stays.
        write(&path, "  \n");
        assert_eq!(*watched.get().unwrap(), "second");
        // Gone for a moment: still the last good one.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(*watched.get().unwrap(), "second");
        write(&path, "third");
        assert_eq!(*watched.get().unwrap(), "third");
    }

    #[test]
    fn a_bad_file_fails_at_open_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write(&path, "has space");
        let err = Watched::open(&path, parse_token).unwrap_err();
        assert!(
            err.contains("spaces") && !err.contains("has space"),
            "{err}"
        );
        let err = Watched::open(&dir.path().join("missing"), parse_token).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }
}
