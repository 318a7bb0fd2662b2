//! Tunnel session state: registration, heartbeat, ping and read-deadline timers.

use heapless::String;

use crate::keepalive::Keepalive;
use crate::time::Instant;
use crate::wire::Extensions;

/// Who the agent is, for `register` and `heartbeat`. Fields longer than their capacity are cut at a
/// character boundary by [`SessionInfo::new`] and [`SessionInfo::set`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionInfo {
    /// `agent_id`.
    pub agent_id: String<64>,
    /// `name` (cluster name).
    pub name: String<64>,
    /// `hostname`.
    pub hostname: String<64>,
    /// `agent_version`.
    pub agent_version: String<32>,
    /// `k8s_version`.
    pub k8s_version: String<32>,
    /// `server_ip`.
    pub server_ip: String<64>,
    /// `region`.
    pub region: String<32>,
    /// `cloud_provider`.
    pub cloud_provider: String<32>,
    /// Cluster id from an earlier registration, sent to resume it.
    pub cluster_id: Option<String<64>>,
}

impl SessionInfo {
    /// Every field empty (usable in `const` contexts, unlike `Default`).
    pub const EMPTY: Self = Self {
        agent_id: String::new(),
        name: String::new(),
        hostname: String::new(),
        agent_version: String::new(),
        k8s_version: String::new(),
        server_ip: String::new(),
        region: String::new(),
        cloud_provider: String::new(),
        cluster_id: None,
    };

    /// Info with `agent_id`, `name` and `agent_version` set and every other field empty.
    #[must_use]
    pub fn new(agent_id: &str, name: &str, agent_version: &str) -> Self {
        Self {
            agent_id: Self::set(agent_id),
            name: Self::set(name),
            agent_version: Self::set(agent_version),
            ..Self::default()
        }
    }

    /// `value` cut to fit a field of capacity `N`.
    #[must_use]
    pub fn set<const N: usize>(value: &str) -> String<N> {
        super::event::truncated(value.chars())
    }
}

/// Session bookkeeping of a relay.
#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) info: SessionInfo,
    /// `register` is owed to the control plane.
    pub(crate) register_pending: bool,
    pub(crate) registered: bool,
    pub(crate) cluster_id: String<64>,
    /// Extensions in use: offered by the agent and advertised by the control plane.
    pub(crate) extensions: Extensions,
    /// Highest native stream number started on this session (numbers are never reused).
    pub(crate) highest_wire: u32,
    pub(crate) owe_registered: bool,
    pub(crate) heartbeat_pending: bool,
    pub(crate) next_heartbeat: Option<Instant>,
    /// Ping and read-deadline timers.
    pub(crate) keepalive: Keepalive,
}

impl Session {
    /// No session (same as `Default`, usable in `const` contexts).
    pub(crate) const fn new() -> Self {
        Self {
            info: SessionInfo::EMPTY,
            register_pending: false,
            registered: false,
            cluster_id: String::new(),
            extensions: Extensions::NONE,
            highest_wire: 0,
            owe_registered: false,
            heartbeat_pending: false,
            next_heartbeat: None,
            keepalive: Keepalive::IDLE,
        }
    }

    /// Earliest pending session timer.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        [self.next_heartbeat, self.keepalive.next_timeout()]
            .into_iter()
            .flatten()
            .min()
    }
}
