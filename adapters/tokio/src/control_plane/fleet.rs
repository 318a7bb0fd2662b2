//! Several control-plane replicas serving one fleet: which replica holds which cluster's tunnel,
//! kept in Redis under leases, and the replica-to-replica hop that carries a user's request to it.
//!
//! Keys (every value a short string, every key with a lease of [`LEASE`]):
//!
//! * `tether:replica:<id>` = the URL peers reach replica `<id>` at ([`FleetConfig::advertise`]).
//! * `tether:tunnel:<cluster>` = the id of a replica holding a registered tunnel of `<cluster>`.
//!
//! A replica writes the tunnel key when an agent registers and renews it, with its own replica
//! key, every [`RENEW`]; when its last tunnel of a cluster ends it deletes the key if it still
//! names itself. A replica that dies stops renewing: its keys expire within [`LEASE`], and
//! before that the agents it held have usually redialled another replica, which overwrites the
//! tunnel key at once. Redis holds nothing else: no stream state, no tokens.
//!
//! A request for a cluster whose tunnel is elsewhere is carried to the owner over HTTPS (verified
//! against [`FleetConfig::peer_tls`]) with the shared peer token ([`PEER_TOKEN_HEADER`], compared
//! in constant time); the owner authenticates the user again from its own registry and never
//! forwards a peer's request further.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// How long a key lives without renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a live replica renews its keys.
pub const RENEW: Duration = Duration::from_secs(5);
/// The request header carrying the peer token on a replica-to-replica request.
pub const PEER_TOKEN_HEADER: &str = "tether-peer-token";
/// The request header naming the replica a peer request comes from (for logs).
pub const PEER_FROM_HEADER: &str = "tether-peer-from";

/// Deletes a key only while it still holds the given value (a newer owner's key stays).
const DELETE_IF_MINE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// How to join the fleet.
#[derive(Clone)]
pub struct FleetConfig {
    /// `redis://HOST:PORT[/DB]` (or `rediss://` for TLS).
    pub redis_url: String,
    /// This replica's id: unique in the fleet, stable across restarts if possible (a pod name).
    pub replica_id: String,
    /// The base URL peers reach this replica at, e.g. `https://10.0.3.7:8443`.
    pub advertise: String,
    /// The token every replica of the fleet shares.
    pub peer_token: String,
    /// Whom peers' TLS certificates must chain to: `None` trusts exactly this replica's own
    /// certificate (replicas sharing one certificate, self-signed or not); otherwise built from
    /// `--peer-ca-file`.
    pub peer_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("replica_id", &self.replica_id)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

/// Why the fleet could not be joined or read.
#[derive(Debug)]
pub struct FleetError(pub String);

impl std::fmt::Display for FleetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fleet registry (Redis): {}", self.0)
    }
}

impl std::error::Error for FleetError {}

impl From<redis::RedisError> for FleetError {
    fn from(e: redis::RedisError) -> Self {
        Self(e.to_string())
    }
}

/// Where a cluster's tunnel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) replica: String,
    pub(crate) url: String,
}

/// This replica's membership in the fleet.
pub struct Fleet {
    redis: ConnectionManager,
    replica_id: String,
    advertise: String,
    peer_token_digest: [u8; 32],
    peer_token: String,
    pub(crate) peer_tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// Clusters this replica has a registered tunnel of, renewed every [`RENEW`].
    held: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("replica_id", &self.replica_id)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

fn replica_key(id: &str) -> String {
    format!("tether:replica:{id}")
}

fn tunnel_key(cluster: &str) -> String {
    format!("tether:tunnel:{cluster}")
}

fn lease_ms() -> u64 {
    u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX)
}

impl Fleet {
    /// Connects to Redis and announces this replica.
    ///
    /// # Errors
    /// [`FleetError`] when Redis cannot be reached or the configuration is unusable.
    pub async fn join(
        config: FleetConfig,
        peer_tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Result<Arc<Self>, FleetError> {
        if config.peer_token.len() < 16 {
            return Err(FleetError(
                "the peer token must be at least 16 characters".into(),
            ));
        }
        let client = redis::Client::open(config.redis_url.as_str())?;
        let redis = tokio::time::timeout(Duration::from_secs(10), ConnectionManager::new(client))
            .await
            .map_err(|_| FleetError("connecting timed out after 10 s".into()))??;
        let fleet = Arc::new(Self {
            redis,
            peer_token_digest: Sha256::digest(config.peer_token.as_bytes()).into(),
            peer_token: config.peer_token,
            replica_id: config.replica_id,
            advertise: config.advertise.trim_end_matches('/').to_string(),
            peer_tls,
            held: Mutex::new(HashSet::new()),
        });
        fleet.renew().await?;
        Ok(fleet)
    }

    /// This replica's id.
    #[must_use]
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Renews this replica's keys every [`RENEW`] until the task is dropped; a failed renewal
    /// is logged and retried at the next turn.
    pub(crate) async fn renew_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, "cannot renew this replica's leases");
            }
        }
    }

    async fn renew(&self) -> Result<(), FleetError> {
        let held: Vec<String> = self.lock().iter().cloned().collect();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(replica_key(&self.replica_id))
            .arg(&self.advertise)
            .arg("PX")
            .arg(lease_ms())
            .ignore();
        for cluster in &held {
            pipe.cmd("SET")
                .arg(tunnel_key(cluster))
                .arg(&self.replica_id)
                .arg("PX")
                .arg(lease_ms())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.redis.clone()).await?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `cluster` as held here (its agent registered here): renewed from now on. Call
    /// before [`Self::tunnel_up`].
    pub(crate) fn hold(&self, cluster: &str) {
        self.lock().insert(cluster.to_string());
    }

    /// Marks `cluster` as no longer held here (its last tunnel here ended). Call before
    /// [`Self::tunnel_down`].
    pub(crate) fn release(&self, cluster: &str) {
        self.lock().remove(cluster);
    }

    /// Records in Redis that this replica holds a tunnel of `cluster`.
    pub(crate) async fn tunnel_up(&self, cluster: &str) {
        let set = redis::cmd("SET")
            .arg(tunnel_key(cluster))
            .arg(&self.replica_id)
            .arg("PX")
            .arg(lease_ms())
            .query_async::<()>(&mut self.redis.clone())
            .await;
        if let Err(e) = set {
            // The next renewal writes it again.
            tracing::warn!(cluster, error = %e, "cannot record the tunnel in the fleet registry");
        }
    }

    /// Records in Redis that this replica's last tunnel of `cluster` ended, unless one came
    /// back meanwhile ([`Self::hold`] again).
    pub(crate) async fn tunnel_down(&self, cluster: &str) {
        if self.lock().contains(cluster) {
            return;
        }
        let deleted = redis::Script::new(DELETE_IF_MINE)
            .key(tunnel_key(cluster))
            .arg(&self.replica_id)
            .invoke_async::<i64>(&mut self.redis.clone())
            .await;
        if let Err(e) = deleted {
            // The lease ends it.
            tracing::warn!(cluster, error = %e, "cannot clear the tunnel in the fleet registry");
        }
    }

    /// The other replica holding `cluster`'s tunnel, if any.
    ///
    /// # Errors
    /// [`FleetError`] when Redis cannot be read.
    pub(crate) async fn owner(&self, cluster: &str) -> Result<Option<Owner>, FleetError> {
        let mut redis = self.redis.clone();
        let replica: Option<String> = redis::cmd("GET")
            .arg(tunnel_key(cluster))
            .query_async(&mut redis)
            .await?;
        let Some(replica) = replica.filter(|r| *r != self.replica_id) else {
            return Ok(None);
        };
        let url: Option<String> = redis::cmd("GET")
            .arg(replica_key(&replica))
            .query_async(&mut redis)
            .await?;
        Ok(url.map(|url| Owner { replica, url }))
    }

    /// Leaves the fleet: drops this replica's keys so peers stop sending it requests now rather
    /// than when the leases end.
    pub(crate) async fn leave(&self) {
        let held: Vec<String> = self.lock().drain().collect();
        for cluster in &held {
            let _ = redis::Script::new(DELETE_IF_MINE)
                .key(tunnel_key(cluster))
                .arg(&self.replica_id)
                .invoke_async::<i64>(&mut self.redis.clone())
                .await;
        }
        let _ = redis::Script::new(DELETE_IF_MINE)
            .key(replica_key(&self.replica_id))
            .arg(&self.advertise)
            .invoke_async::<i64>(&mut self.redis.clone())
            .await;
    }

    /// Whether `presented` is the fleet's peer token (constant time).
    pub(crate) fn is_peer(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(digest.ct_eq(&self.peer_token_digest))
    }

    /// The peer token, for requests to peers.
    pub(crate) fn peer_token(&self) -> &str {
        &self.peer_token
    }
}
