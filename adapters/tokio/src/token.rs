//! Bearer-token tables compared in constant time, from flags and from files re-read on change.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::watched::{Parse, Watched};

/// Tokens mapped to the name they authenticate (a cluster for agents, a user for kubectl).
///
/// Only SHA-256 digests are kept, so neither the table nor a comparison reveals a token's length,
/// and [`TokenTable::lookup`] compares the presented token against every entry without stopping
/// at the first match: its timing does not depend on which entry (if any) matched. Tokens never
/// appear in `Debug` output.
#[derive(Default, Clone)]
pub struct TokenTable {
    entries: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTable")
            .field(
                "names",
                &self.entries.iter().map(|(_, n)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TokenTable {
    /// An empty table: every lookup fails.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` for `name`. A token already present keeps its first name.
    pub fn insert(&mut self, name: impl Into<String>, token: &str) {
        let digest = digest(token);
        if !self.entries.iter().any(|(d, _)| *d == digest) {
            self.entries.push((digest, name.into()));
        }
    }

    /// The name `token` authenticates, if any; constant time in the token and the entries.
    pub fn lookup(&self, token: &str) -> Option<&str> {
        let presented = digest(token);
        let mut found = None;
        for (known, name) in &self.entries {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The token of an `Authorization: Bearer <token>` header value, if it has that form.
    pub fn bearer(header_value: &str) -> Option<&str> {
        let (scheme, token) = header_value.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A token file: one `NAME=TOKEN` per line; blank lines and lines starting with `#` are skipped.
/// White space around either part is ignored. Errors name the line, never its token.
pub fn parse_table(bytes: &[u8]) -> Result<TokenTable, String> {
    parse_lines(bytes, |_| true)
}

/// As [`parse_table`], with every name a cluster name (1-63 characters of `A-Za-z0-9._-`).
pub fn parse_cluster_table(bytes: &[u8]) -> Result<TokenTable, String> {
    parse_lines(bytes, |name| {
        name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    })
}

fn parse_lines(bytes: &[u8], name_ok: fn(&str) -> bool) -> Result<TokenTable, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut table = TokenTable::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}", n + 1);
        let (name, token) = line
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=TOKEN"))?;
        let (name, token) = (name.trim(), token.trim());
        if name.is_empty() || token.is_empty() {
            return Err(bad("expected NAME=TOKEN with both parts non-empty"));
        }
        if !name_ok(name) || name.chars().any(char::is_control) {
            return Err(bad(&format!("{name:?} is not a valid name here")));
        }
        if token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("the token contains spaces or control characters"));
        }
        table.insert(name, token);
    }
    Ok(table)
}

/// The tokens a listener accepts: those given as flags plus those of a file re-read whenever it
/// changes (a rotated Kubernetes Secret takes effect without a restart; a bad change keeps the
/// last good table, see [`crate::watched`]).
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    fixed: TokenTable,
    file: Option<Arc<Watched<TokenTable>>>,
}

impl Tokens {
    /// Tokens from flags only.
    #[must_use]
    pub fn fixed(table: TokenTable) -> Self {
        Self {
            fixed: table,
            file: None,
        }
    }

    /// Adds a token file, parsed by `parse` ([`parse_table`] or [`parse_cluster_table`]).
    ///
    /// # Errors
    /// One line when the file cannot be read or parsed now.
    pub fn with_file(mut self, path: &Path, parse: Parse<TokenTable>) -> Result<Self, String> {
        self.file = Some(Arc::new(Watched::open(path, parse)?));
        Ok(self)
    }

    /// The name `token` authenticates. Both tables are searched in full, in constant time
    /// (see [`TokenTable::lookup`]); a token in both keeps the flag's name.
    #[must_use]
    pub fn lookup(&self, token: &str) -> Option<String> {
        let from_file = self.file.as_ref().and_then(|f| match f.get() {
            Ok(table) => table.lookup(token).map(str::to_owned),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        });
        let from_flags = self.fixed.lookup(token).map(str::to_owned);
        from_flags.or(from_file)
    }

    /// Whether no token can ever match (no flag tokens and no file).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.file.is_none()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_only_exact_tokens() {
        let mut t = TokenTable::new();
        t.insert("alice", "s3cret");
        t.insert("bob", "other");
        assert_eq!(t.lookup("s3cret"), Some("alice"));
        assert_eq!(t.lookup("other"), Some("bob"));
        assert_eq!(t.lookup("s3cre"), None);
        assert_eq!(t.lookup("s3cret "), None);
        assert_eq!(t.lookup(""), None);
    }

    #[test]
    fn duplicate_token_keeps_first_name() {
        let mut t = TokenTable::new();
        t.insert("alice", "x");
        t.insert("mallory", "x");
        assert_eq!(t.lookup("x"), Some("alice"));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(TokenTable::bearer("Bearer abc"), Some("abc"));
        assert_eq!(TokenTable::bearer("bearer   abc "), Some("abc"));
        assert_eq!(TokenTable::bearer("Basic abc"), None);
        assert_eq!(TokenTable::bearer("Bearer "), None);
        assert_eq!(TokenTable::bearer("Bearer"), None);
    }

    #[test]
    fn token_files_parse_names_and_tokens_and_name_bad_lines() {
        let t = parse_table(b"# users\nalice = s3cret\n\nbob=other\n").unwrap();
        assert_eq!(t.lookup("s3cret"), Some("alice"));
        assert_eq!(t.lookup("other"), Some("bob"));
        let err = parse_table(b"alice=ok\nbroken line\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = parse_table(b"alice=has space\n").unwrap_err();
        assert!(
            err.contains("line 1") && !err.contains("has space"),
            "{err}"
        );
        assert!(parse_table(b"=tok\n").is_err());
        assert!(parse_cluster_table(b"c1=tok\n").is_ok());
        assert!(parse_cluster_table(b"c/1=tok\n").is_err());
    }

    #[test]
    fn tokens_from_a_file_follow_its_changes_beside_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents");
        let write = |text: &str| {
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write("c1=old\n");
        let mut flags = TokenTable::new();
        flags.insert("c0", "flag");
        let tokens = Tokens::fixed(flags)
            .with_file(&path, parse_cluster_table)
            .unwrap();
        assert_eq!(tokens.lookup("old").as_deref(), Some("c1"));
        assert_eq!(tokens.lookup("flag").as_deref(), Some("c0"));
        write("c1=new\n");
        assert_eq!(tokens.lookup("old"), None);
        assert_eq!(tokens.lookup("new").as_deref(), Some("c1"));
        assert_eq!(tokens.lookup("flag").as_deref(), Some("c0"));
    }

    #[test]
    fn debug_never_shows_tokens() {
        let mut t = TokenTable::new();
        t.insert("alice", "TOPSECRET");
        let shown = format!("{t:?}");
        assert!(shown.contains("alice") && !shown.contains("TOPSECRET"));
    }
}
