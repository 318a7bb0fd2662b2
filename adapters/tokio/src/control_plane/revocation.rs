//! Tunnels of agents whose registry token was revoked (`cluster rotate-token`, `cluster
//! remove`) end within one recheck interval, not at their next reconnect.
//!
//! One query per interval, whatever the number of tunnels: the set of valid token hashes, against
//! the hash each live registry-authenticated tunnel was opened with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::State;
use super::link::Cmd;

/// Default [`super::ControlPlaneConfig::registry_recheck`].
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(30);

/// Why a tunnel of a revoked token ends.
const REVOKED: &str = "agent token revoked or cluster removed";

/// Live tunnels opened with a registry token, by generation.
#[derive(Debug, Default)]
pub(crate) struct RegistryTunnels {
    live: Mutex<HashMap<u64, (String, mpsc::UnboundedSender<Cmd>)>>,
}

impl RegistryTunnels {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (String, mpsc::UnboundedSender<Cmd>)>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tunnel `generation` was opened with the token of registry hash `hash`.
    pub(crate) fn insert(&self, generation: u64, hash: String, tx: mpsc::UnboundedSender<Cmd>) {
        self.lock().insert(generation, (hash, tx));
    }

    /// Tunnel `generation` ended.
    pub(crate) fn remove(&self, generation: u64) {
        self.lock().remove(&generation);
    }
}

/// Every `every`, ends the tunnels whose token the registry no longer holds. A registry that
/// cannot be read ends nothing (logged; tried again next time).
pub(crate) async fn sweep_forever(state: Arc<State>, every: Duration) {
    let Some(registry) = state.registry.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let valid = match registry.agent_token_hashes().await {
            Ok(valid) => valid,
            Err(e) => {
                tracing::warn!(error = %e, "cannot recheck agent tokens");
                continue;
            }
        };
        let revoked: Vec<(u64, mpsc::UnboundedSender<Cmd>)> = state
            .registry_tunnels
            .lock()
            .iter()
            .filter(|(_, (hash, _))| !valid.contains(hash))
            .map(|(generation, (_, tx))| (*generation, tx.clone()))
            .collect();
        for (generation, tx) in revoked {
            tracing::warn!(generation, "ending a tunnel: {REVOKED}");
            let _ = tx.send(Cmd::End { reason: REVOKED });
            state.registry_tunnels.remove(generation);
        }
    }
}
