//! Per-user stream limits: how many streams and requests one user may have open on one cluster
//! at a time, so one user's hundreds of `logs -f` or watches never take the slots every other
//! user needs (the agent's request table and the tunnel are shared by the whole cluster).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Default [`crate::control_plane::ControlPlaneConfig::max_streams_per_user`]: half the agent's
/// concurrent request table, so other users always keep room.
pub const DEFAULT_MAX_STREAMS_PER_USER: usize = 128;

/// Live streams per (cluster, user).
#[derive(Debug)]
pub(crate) struct UserLimits {
    /// 0: no limit.
    per_user: usize,
    live: Mutex<HashMap<(String, String), usize>>,
}

/// One open stream counted against its user; released when dropped.
#[derive(Debug)]
pub(crate) struct UserSlot {
    limits: Arc<UserLimits>,
    key: (String, String),
}

impl UserLimits {
    pub(crate) fn new(per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            per_user,
            live: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), usize>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new stream of `user` on `cluster`; `Err(limit)` when the user is at the limit.
    pub(crate) fn acquire(self: &Arc<Self>, cluster: &str, user: &str) -> Result<UserSlot, usize> {
        let key = (cluster.to_string(), user.to_string());
        let mut live = self.lock();
        let n = live.entry(key.clone()).or_insert(0);
        if self.per_user != 0 && *n >= self.per_user {
            return Err(self.per_user);
        }
        *n += 1;
        Ok(UserSlot {
            limits: self.clone(),
            key,
        })
    }

    /// Streams `user` has open on `cluster`.
    #[cfg(test)]
    pub(crate) fn live(&self, cluster: &str, user: &str) -> usize {
        self.lock()
            .get(&(cluster.to_string(), user.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut live = self.limits.lock();
        if let Some(n) = live.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                live.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_at_the_limit_is_refused_and_others_are_not() {
        let limits = UserLimits::new(2);
        let a1 = limits.acquire("c1", "alice").unwrap();
        let _a2 = limits.acquire("c1", "alice").unwrap();
        assert_eq!(limits.acquire("c1", "alice").unwrap_err(), 2);
        // Another user, and the same user on another cluster, are not affected.
        let _b = limits.acquire("c1", "bob").unwrap();
        let _a_other = limits.acquire("c2", "alice").unwrap();
        drop(a1);
        assert_eq!(limits.live("c1", "alice"), 1);
        let _a3 = limits.acquire("c1", "alice").unwrap();
        let unlimited = UserLimits::new(0);
        let many: Vec<_> = (0..1000)
            .map(|_| unlimited.acquire("c", "u").unwrap())
            .collect();
        assert_eq!(unlimited.live("c", "u"), 1000);
        drop(many);
        assert_eq!(unlimited.live("c", "u"), 0);
    }
}
