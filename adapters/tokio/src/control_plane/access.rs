//! Who a request is and whether it may reach a cluster: agent tokens name a cluster, user tokens
//! a user and (from the registry) its groups there.
//!
//! Tokens given as flags or in token files are searched first, in constant time
//! ([`crate::token::Tokens`]): a flag user reaches every cluster, as the demo and single-tenant
//! set-ups want. Then the [`Registry`](super::registry::Registry), where a user reaches only the
//! clusters it was granted, as the groups of its grant.

use http::HeaderMap;

use super::registry::Access;
use super::status::status_response;
use super::{Body, State, token_of};

/// An authenticated user allowed on one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// `Impersonate-User`.
    pub(crate) user: String,
    /// `Impersonate-Group`s, in order.
    pub(crate) groups: Vec<String>,
}

/// The identity `headers`' bearer token gives on `cluster`, or the response refusing it:
/// 401 for a missing or unknown token, 403 for a known user without a grant there, 503 when the
/// registry cannot be read.
pub(crate) async fn user(
    state: &State,
    headers: &HeaderMap,
    cluster: &str,
) -> Result<Identity, http::Response<Body>> {
    let unauthorized = || {
        state.metrics.auth_refused();
        status_response(401, "Unauthorized: a valid bearer user token is required")
    };
    let Some(token) = token_of(headers) else {
        return Err(unauthorized());
    };
    if let Some(user) = state.user_tokens.lookup(token) {
        return Ok(Identity {
            user,
            groups: Vec::new(),
        });
    }
    let Some(registry) = &state.registry else {
        return Err(unauthorized());
    };
    match registry.access(token, cluster).await {
        Ok(Access::Granted { user, groups }) => Ok(Identity { user, groups }),
        Ok(Access::NoGrant { user }) => {
            state.metrics.auth_refused();
            tracing::info!(cluster, user, "request refused: no grant on the cluster");
            Err(status_response(
                403,
                &format!(
                    "user \"{user}\" has no grant on cluster \"{cluster}\" (tether-control-plane user grant)"
                ),
            ))
        }
        Ok(Access::Unknown) => Err(unauthorized()),
        Err(e) => {
            tracing::warn!(cluster, error = %e, "cannot read the registry");
            Err(status_response(
                503,
                "the control plane cannot read its cluster registry; try again",
            ))
        }
    }
}

/// An authenticated agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Agent {
    /// The cluster its token names.
    pub(crate) cluster: String,
    /// The token's registry hash, when the registry (not a flag or file) knew it: the tunnel is
    /// ended once the token is revoked (see [`super::revocation`]).
    pub(crate) registry_hash: Option<String>,
}

/// The agent an agent's bearer token names, if any (flags and files first, then the registry).
pub(crate) async fn agent(state: &State, headers: &HeaderMap) -> Option<Agent> {
    let token = token_of(headers)?;
    if let Some(cluster) = state.agent_tokens.lookup(token) {
        return Some(Agent {
            cluster,
            registry_hash: None,
        });
    }
    match state.registry.as_ref()?.agent_cluster(token).await {
        Ok(cluster) => cluster.map(|cluster| Agent {
            cluster,
            registry_hash: Some(super::registry::hash_token(token)),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the registry: agent refused");
            None
        }
    }
}
