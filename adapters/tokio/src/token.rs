//! Bearer-token tables compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
    fn debug_never_shows_tokens() {
        let mut t = TokenTable::new();
        t.insert("alice", "TOPSECRET");
        let shown = format!("{t:?}");
        assert!(shown.contains("alice") && !shown.contains("TOPSECRET"));
    }
}
