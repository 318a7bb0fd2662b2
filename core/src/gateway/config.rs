//! Gateway configuration and its defaults.

use crate::relay::DEFAULT_MAX_MESSAGE;
use crate::ring::{DEFAULT_GLOBAL_BYTES, DEFAULT_RING_BYTES};
use crate::time::Duration;
use crate::wire::Extensions;

/// Tunables of a [`Gateway`](super::Gateway). `Config::default()` gives the documented defaults; the
/// ring message capacity is the `RING` const generic of the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// Byte budget of each per-stream ring, per direction (default 1 MiB).
    pub ring_bytes: usize,
    /// Largest tunnel WebSocket message accepted or produced, in bytes (default 16 MiB). A larger
    /// agent message is refused (its stream, if any, closed with 1009); a larger client message is
    /// handed back.
    pub max_message: usize,
    /// How long a stream or request may wait for the agent's answer to its start (upstream 101,
    /// refusal or response header) before it fails with status 504 (default 45 s: longer than the
    /// agent's own 30 s dial timeout, so the agent's answer normally wins).
    pub start_timeout: Duration,
    /// How long the agent may be quiet before [`Event::SendPing`](super::Event::SendPing)
    /// (default 25 s: longer than a Tether agent's own 20 s, so a Tether tunnel at rest carries
    /// only the agent's pings; a PipeOps agent, which may not ping, is pinged).
    pub ping_interval: Duration,
    /// Tunnel silence after which [`Event::TunnelDead`](super::Event::TunnelDead) fires (default
    /// 60 s).
    pub read_deadline: Duration,
    /// Compat wire mode: how long one stream may keep the tunnel reader paused (because its client reads nothing)
    /// before that stream alone is closed with a reason and the others resume (default 30 s).
    /// A paused reader never counts as a silent tunnel.
    pub pause_limit: Duration,
    /// Tether extensions advertised in `register_success`. Each is used only if the agent offered it
    /// in `register` too (default: all).
    pub extensions: Extensions,
    /// Bytes all streams of the tunnel may queue toward the agent together (default 64 MiB); see
    /// [`crate::budget`].
    pub global_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ring_bytes: DEFAULT_RING_BYTES,
            max_message: DEFAULT_MAX_MESSAGE,
            start_timeout: Duration::from_secs(45),
            ping_interval: Duration::from_secs(25),
            read_deadline: Duration::from_secs(60),
            pause_limit: Duration::from_secs(30),
            extensions: Extensions::ALL,
            global_bytes: DEFAULT_GLOBAL_BYTES,
        }
    }
}
