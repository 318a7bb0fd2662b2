//! The cluster registry: clusters, their agent tokens, users, and which user may reach which
//! cluster as which Kubernetes groups, kept in a database.
//!
//! * SQLite is the embedded default: one file in the state directory ([`Registry::sqlite_url`]),
//!   created on first use, in WAL mode so the `cluster`/`user` commands and `serve` (and replicas
//!   on one host) share it.
//! * PostgreSQL (`postgres://…`) for replicated deployments: every replica opens the same one.
//!
//! The schema is the embedded migrations (`adapters/tokio/migrations/`), applied by
//! [`Registry::open`]; one SQL text serves both databases.
//!
//! Tokens are generated here from the operating system's random source, shown once by the
//! command that creates them, and stored only as their SHA-256 ([`hash_token`]). A lookup finds
//! the row by that hash: its timing depends on the hash, never on how much of a token was right.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row as _};

/// The schema, in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "registry",
    include_str!("../../migrations/0001_registry.sql"),
)];

/// Why a registry operation failed.
#[derive(Debug)]
pub enum RegistryError {
    /// The database could not be opened, migrated or queried.
    Database(String),
    /// A cluster, user or grant of that name already exists.
    Exists(String),
    /// No cluster, user or grant of that name.
    NotFound(String),
    /// A name or group that the registry does not take.
    Invalid(String),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Database(e) => write!(f, "registry: {e}"),
            Self::Exists(what) => write!(f, "{what} already exists"),
            Self::NotFound(what) => write!(f, "{what} does not exist"),
            Self::Invalid(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for RegistryError {}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e.to_string())
    }
}

/// What a user token may do on one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The token is no user's.
    Unknown,
    /// A known user without a grant on that cluster.
    NoGrant {
        /// The user.
        user: String,
    },
    /// The user may reach the cluster, impersonating these groups.
    Granted {
        /// The user (`Impersonate-User`).
        user: String,
        /// Its groups there (`Impersonate-Group`, in order).
        groups: Vec<String>,
    },
}

/// One cluster, as `cluster list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEntry {
    /// Its name (the path segment of `/clusters/<name>/`).
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// How many agent tokens it has.
    pub tokens: i64,
    /// Users granted access to it.
    pub users: Vec<String>,
}

/// One user, as `user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// Its name (`Impersonate-User`).
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Each cluster it may reach, with its groups there.
    pub grants: Vec<(String, Vec<String>)>,
}

/// A database of clusters, users and grants; cheap to clone (a connection pool).
#[derive(Clone)]
pub struct Registry {
    pool: AnyPool,
    url_for_logs: String,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("database", &self.url_for_logs)
            .finish_non_exhaustive()
    }
}

/// The registry file in a state directory.
pub const SQLITE_FILE: &str = "registry.db";

impl Registry {
    /// The URL of the embedded SQLite registry in `state_dir` (created on first open).
    #[must_use]
    pub fn sqlite_url(state_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            state_dir.join(SQLITE_FILE).display()
        )
    }

    /// Opens the database at `url` (`sqlite://FILE?mode=rwc` or `postgres://…`) and applies the
    /// migrations it lacks.
    ///
    /// # Errors
    /// [`RegistryError::Database`] when it cannot be reached or migrated.
    pub async fn open(url: &str) -> Result<Self, RegistryError> {
        sqlx::any::install_default_drivers();
        let url_for_logs = redact_url(url);
        let options: AnyConnectOptions = url
            .parse()
            .map_err(|e| RegistryError::Database(format!("{url_for_logs}: {e}")))?;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // Several processes share the file: readers never wait for the writer,
                        // and a writer waits for another instead of failing at once.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        // WAL's own recommendation: durable at checkpoints, never corrupt.
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA foreign_keys = ON")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| RegistryError::Database(format!("{url_for_logs}: {e}")))?;
        Migrator::new(Embedded)
            .await
            .map_err(|e| RegistryError::Database(format!("migrations: {e}")))?
            .run(&pool)
            .await
            .map_err(|e| RegistryError::Database(format!("{url_for_logs}: migrating: {e}")))?;
        Ok(Self { pool, url_for_logs })
    }

    /// Adds cluster `name` with a new agent token, returned (shown once; only its hash is kept).
    ///
    /// # Errors
    /// [`RegistryError::Invalid`] for a bad name, [`RegistryError::Exists`] when it exists.
    pub async fn add_cluster(&self, name: &str) -> Result<String, RegistryError> {
        check_name("cluster", name)?;
        let token = new_token("tta");
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO clusters (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(RegistryError::Exists(format!("cluster {name:?}")));
        }
        insert_agent_token(&mut tx, name, &token).await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Replaces every agent token of cluster `name` by a new one, returned. Agents holding an
    /// old token are refused from their next connection on.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] when the cluster does not exist.
    pub async fn rotate_cluster_token(&self, name: &str) -> Result<String, RegistryError> {
        let token = new_token("tta");
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT name FROM clusters WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(RegistryError::NotFound(format!("cluster {name:?}")));
        }
        sqlx::query("DELETE FROM agent_tokens WHERE cluster = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        insert_agent_token(&mut tx, name, &token).await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Removes cluster `name`, its agent tokens and every grant on it.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] when it does not exist.
    pub async fn remove_cluster(&self, name: &str) -> Result<(), RegistryError> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM grants WHERE cluster = $1",
            "DELETE FROM agent_tokens WHERE cluster = $1",
        ] {
            sqlx::query(sql).bind(name).execute(&mut *tx).await?;
        }
        let removed = sqlx::query("DELETE FROM clusters WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if removed.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!("cluster {name:?}")));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every cluster, by name.
    ///
    /// # Errors
    /// [`RegistryError::Database`].
    pub async fn clusters(&self) -> Result<Vec<ClusterEntry>, RegistryError> {
        let rows = sqlx::query(
            "SELECT c.name, c.created_at, (SELECT COUNT(*) FROM agent_tokens t WHERE t.cluster = c.name) AS tokens FROM clusters c ORDER BY c.name",
        )
        .fetch_all(&self.pool)
        .await?;
        let grants = self.all_grants().await?;
        rows.iter()
            .map(|r| {
                let name: String = r.try_get(0)?;
                let users = grants
                    .iter()
                    .filter(|(_, c, _)| *c == name)
                    .map(|(u, _, _)| u.clone())
                    .collect();
                Ok(ClusterEntry {
                    created_at: r.try_get(1)?,
                    tokens: r.try_get(2)?,
                    users,
                    name,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The cluster an agent token names, if any.
    ///
    /// # Errors
    /// [`RegistryError::Database`].
    pub async fn agent_cluster(&self, token: &str) -> Result<Option<String>, RegistryError> {
        let row = sqlx::query("SELECT cluster FROM agent_tokens WHERE token_hash = $1")
            .bind(hash_token(token))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The hash of every agent token the registry holds now.
    ///
    /// # Errors
    /// [`RegistryError::Database`].
    pub async fn agent_token_hashes(
        &self,
    ) -> Result<std::collections::HashSet<String>, RegistryError> {
        let rows = sqlx::query("SELECT token_hash FROM agent_tokens")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Adds user `name` with a new token, returned (shown once; only its hash is kept).
    ///
    /// # Errors
    /// [`RegistryError::Invalid`] for a bad name, [`RegistryError::Exists`] when it exists.
    pub async fn add_user(&self, name: &str) -> Result<String, RegistryError> {
        check_user(name)?;
        let token = new_token("ttu");
        let inserted = sqlx::query(
            "INSERT INTO users (name, token_hash, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(hash_token(&token))
        .bind(now())
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(RegistryError::Exists(format!("user {name:?}")));
        }
        Ok(token)
    }

    /// Replaces user `name`'s token by a new one, returned; the old one stops working at once.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] when the user does not exist.
    pub async fn rotate_user_token(&self, name: &str) -> Result<String, RegistryError> {
        let token = new_token("ttu");
        let updated = sqlx::query("UPDATE users SET token_hash = $1 WHERE name = $2")
            .bind(hash_token(&token))
            .bind(name)
            .execute(&self.pool)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!("user {name:?}")));
        }
        Ok(token)
    }

    /// Removes user `name` and its grants.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] when it does not exist.
    pub async fn remove_user(&self, name: &str) -> Result<(), RegistryError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM grants WHERE user_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let removed = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if removed.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!("user {name:?}")));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every user, by name, with its grants.
    ///
    /// # Errors
    /// [`RegistryError::Database`].
    pub async fn users(&self) -> Result<Vec<UserEntry>, RegistryError> {
        let rows = sqlx::query("SELECT name, created_at FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let grants = self.all_grants().await?;
        rows.iter()
            .map(|r| {
                let name: String = r.try_get(0)?;
                let grants = grants
                    .iter()
                    .filter(|(u, _, _)| *u == name)
                    .map(|(_, c, g)| (c.clone(), g.clone()))
                    .collect();
                Ok(UserEntry {
                    created_at: r.try_get(1)?,
                    grants,
                    name,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Lets `user` reach `cluster` as `groups` (replacing the groups of an existing grant).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] when the user or the cluster does not exist,
    /// [`RegistryError::Invalid`] for a bad group.
    pub async fn grant(
        &self,
        user: &str,
        cluster: &str,
        groups: &[String],
    ) -> Result<(), RegistryError> {
        for group in groups {
            check_group(group)?;
        }
        let mut tx = self.pool.begin().await?;
        for (table, what, name) in [("users", "user", user), ("clusters", "cluster", cluster)] {
            let found = sqlx::query(&format!("SELECT name FROM {table} WHERE name = $1"))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(RegistryError::NotFound(format!("{what} {name:?}")));
            }
        }
        sqlx::query(
            "INSERT INTO grants (user_name, cluster, groups, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_name, cluster) DO UPDATE SET groups = excluded.groups",
        )
        .bind(user)
        .bind(cluster)
        .bind(groups.join("\n"))
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes `user`'s access to `cluster` away; its next request there gets 403.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] when there was no such grant.
    pub async fn revoke(&self, user: &str, cluster: &str) -> Result<(), RegistryError> {
        let removed = sqlx::query("DELETE FROM grants WHERE user_name = $1 AND cluster = $2")
            .bind(user)
            .bind(cluster)
            .execute(&self.pool)
            .await?;
        if removed.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "a grant of cluster {cluster:?} to user {user:?}"
            )));
        }
        Ok(())
    }

    /// What the holder of user token `token` may do on `cluster`.
    ///
    /// # Errors
    /// [`RegistryError::Database`].
    pub async fn access(&self, token: &str, cluster: &str) -> Result<Access, RegistryError> {
        let row = sqlx::query(
            "SELECT u.name, g.groups FROM users u \
             LEFT JOIN grants g ON g.user_name = u.name AND g.cluster = $2 \
             WHERE u.token_hash = $1",
        )
        .bind(hash_token(token))
        .bind(cluster)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Access::Unknown);
        };
        let user: String = row.try_get(0)?;
        let groups: Option<String> = row.try_get(1)?;
        Ok(match groups {
            None => Access::NoGrant { user },
            Some(groups) => Access::Granted {
                user,
                groups: split_groups(&groups),
            },
        })
    }

    async fn all_grants(&self) -> Result<Vec<(String, String, Vec<String>)>, RegistryError> {
        let rows = sqlx::query(
            "SELECT user_name, cluster, groups FROM grants ORDER BY cluster, user_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let groups: String = r.try_get(2)?;
                Ok((r.try_get(0)?, r.try_get(1)?, split_groups(&groups)))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

async fn insert_agent_token(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    cluster: &str,
    token: &str,
) -> Result<(), RegistryError> {
    sqlx::query("INSERT INTO agent_tokens (token_hash, cluster, created_at) VALUES ($1, $2, $3)")
        .bind(hash_token(token))
        .bind(cluster)
        .bind(now())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn split_groups(stored: &str) -> Vec<String> {
    stored
        .split('\n')
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The stored form of a token: lowercase hex SHA-256.
#[must_use]
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new token: `prefix`, `_`, then 32 random bytes from the operating system as unpadded
/// base64url (the prefix lets secret scanners and people tell agent from user tokens).
fn new_token(prefix: &str) -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    // The OS random source failing is not something to carry on from: no token is better than a
    // guessable one.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!("{prefix}_{body}")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Cluster names: 1 to 63 characters of `A-Za-z0-9._-` (they are a URL path segment).
fn check_name(what: &str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{what} name {name:?} must be 1-63 characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// User names become `Impersonate-User`: 1 to 253 visible ASCII characters, such as
/// `alice@example.com` or `system:serviceaccount:ci:deployer`.
fn check_user(name: &str) -> Result<(), RegistryError> {
    if !name.is_empty() && name.len() <= 253 && name.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "user name {name:?} must be 1-253 visible ASCII characters"
        )))
    }
}

/// Groups become `Impersonate-Group`: as user names, and without commas (the header's list
/// separator).
fn check_group(group: &str) -> Result<(), RegistryError> {
    if !group.is_empty()
        && group.len() <= 253
        && group.bytes().all(|b| b.is_ascii_graphic() && b != b',')
    {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "group {group:?} must be 1-253 visible ASCII characters without commas"
        )))
    }
}

/// `url` without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The embedded migrations, as sqlx's migrator reads them.
#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> futures_util::future::BoxFuture<
        'static,
        Result<Vec<Migration>, Box<dyn std::error::Error + Send + Sync>>,
    > {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&Registry::sqlite_url(dir.path()))
            .await
            .unwrap();
        (dir, registry)
    }

    #[tokio::test]
    async fn clusters_are_added_found_by_token_rotated_and_removed() {
        let (_dir, r) = open().await;
        let token = r.add_cluster("prod-eu").await.unwrap();
        assert!(token.starts_with("tta_") && token.len() > 40, "{token}");
        assert_eq!(
            r.agent_cluster(&token).await.unwrap().as_deref(),
            Some("prod-eu")
        );
        assert_eq!(r.agent_cluster("tta_nope").await.unwrap(), None);
        assert!(matches!(
            r.add_cluster("prod-eu").await,
            Err(RegistryError::Exists(_))
        ));
        assert!(matches!(
            r.add_cluster("a/b").await,
            Err(RegistryError::Invalid(_))
        ));

        let rotated = r.rotate_cluster_token("prod-eu").await.unwrap();
        assert_ne!(rotated, token);
        assert_eq!(
            r.agent_cluster(&token).await.unwrap(),
            None,
            "old token still valid"
        );
        assert_eq!(
            r.agent_cluster(&rotated).await.unwrap().as_deref(),
            Some("prod-eu")
        );

        let list = r.clusters().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].name.as_str(), list[0].tokens), ("prod-eu", 1));
        r.remove_cluster("prod-eu").await.unwrap();
        assert_eq!(r.agent_cluster(&rotated).await.unwrap(), None);
        assert!(matches!(
            r.remove_cluster("prod-eu").await,
            Err(RegistryError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn access_needs_a_known_token_and_a_grant() {
        let (_dir, r) = open().await;
        r.add_cluster("c1").await.unwrap();
        r.add_cluster("c2").await.unwrap();
        let alice = r.add_user("alice@example.com").await.unwrap();
        assert_eq!(r.access("ttu_wrong", "c1").await.unwrap(), Access::Unknown);
        assert_eq!(
            r.access(&alice, "c1").await.unwrap(),
            Access::NoGrant {
                user: "alice@example.com".into()
            }
        );
        let groups = vec!["dev".to_string(), "system:authenticated".to_string()];
        r.grant("alice@example.com", "c1", &groups).await.unwrap();
        assert_eq!(
            r.access(&alice, "c1").await.unwrap(),
            Access::Granted {
                user: "alice@example.com".into(),
                groups: groups.clone()
            }
        );
        assert!(matches!(
            r.access(&alice, "c2").await.unwrap(),
            Access::NoGrant { .. }
        ));
        // A second grant replaces the groups.
        r.grant("alice@example.com", "c1", &[]).await.unwrap();
        assert_eq!(
            r.access(&alice, "c1").await.unwrap(),
            Access::Granted {
                user: "alice@example.com".into(),
                groups: vec![]
            }
        );
        assert!(matches!(
            r.grant("alice@example.com", "nope", &[]).await,
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            r.grant("alice@example.com", "c1", &["a,b".into()]).await,
            Err(RegistryError::Invalid(_))
        ));
        let users = r.users().await.unwrap();
        assert_eq!(users[0].grants, vec![("c1".to_string(), vec![])]);
        assert_eq!(
            r.clusters().await.unwrap()[0].users,
            vec!["alice@example.com"]
        );

        r.revoke("alice@example.com", "c1").await.unwrap();
        assert!(matches!(
            r.access(&alice, "c1").await.unwrap(),
            Access::NoGrant { .. }
        ));
        assert!(matches!(
            r.revoke("alice@example.com", "c1").await,
            Err(RegistryError::NotFound(_))
        ));

        let rotated = r.rotate_user_token("alice@example.com").await.unwrap();
        assert_eq!(r.access(&alice, "c1").await.unwrap(), Access::Unknown);
        r.grant("alice@example.com", "c2", &[]).await.unwrap();
        // Removing the cluster removes its grants.
        r.remove_cluster("c2").await.unwrap();
        assert!(r.users().await.unwrap()[0].grants.is_empty());
        r.remove_user("alice@example.com").await.unwrap();
        assert_eq!(r.access(&rotated, "c1").await.unwrap(), Access::Unknown);
    }

    #[tokio::test]
    async fn tokens_are_stored_only_as_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&Registry::sqlite_url(dir.path()))
            .await
            .unwrap();
        let agent = r.add_cluster("c1").await.unwrap();
        let user = r.add_user("bob").await.unwrap();
        drop(r);
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&agent) && !text.contains(&user),
            "a token is stored in clear"
        );
    }

    #[tokio::test]
    async fn a_reopened_registry_keeps_its_rows_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = Registry::sqlite_url(dir.path());
        let token = Registry::open(&url)
            .await
            .unwrap()
            .add_cluster("c1")
            .await
            .unwrap();
        let again = Registry::open(&url).await.unwrap();
        assert_eq!(
            again.agent_cluster(&token).await.unwrap().as_deref(),
            Some("c1")
        );
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://tether:s3cret@db:5432/tether"),
            "postgres://tether:***@db:5432/tether"
        );
        assert_eq!(
            redact_url("sqlite:///x/registry.db"),
            "sqlite:///x/registry.db"
        );
    }

    #[test]
    fn new_tokens_differ_and_hash_to_hex() {
        let (a, b) = (new_token("tta"), new_token("tta"));
        assert_ne!(a, b);
        assert_eq!(hash_token(&a).len(), 64);
    }
}
