//! Relay configuration and its defaults.

use crate::ring::{DEFAULT_GLOBAL_BYTES, DEFAULT_RING_BYTES};
use crate::time::Duration;
use crate::wire::Extensions;

/// Default largest tunnel message: 16 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

/// Tunables of a [`Relay`](super::Relay). `Config::default()` gives the documented defaults; the
/// ring message capacity is the `RING` const generic of the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// Byte budget of each per-stream ring, per direction (default 1 MiB).
    pub ring_bytes: usize,
    /// Largest tunnel WebSocket message accepted, in bytes (default 16 MiB). Larger messages are
    /// refused with an error to the sender and their stream, if any, is closed with code 1009.
    pub max_message: usize,
    /// How long a stream may stay `Opening` before it fails with status 504 (default 30 s).
    pub dial_timeout: Duration,
    /// How long a stream closed from the tunnel waits for
    /// [`handle_upstream_closed`](super::Relay::handle_upstream_closed) before its close is echoed
    /// anyway (default 10 s).
    pub close_timeout: Duration,
    /// Interval between `heartbeat` envelopes once registered (default 30 s).
    pub heartbeat_interval: Duration,
    /// How long the control plane may be quiet before [`Event::SendPing`](super::Event::SendPing)
    /// (default 20 s; with the 60 s read deadline a dead peer is still noticed within a minute).
    pub ping_interval: Duration,
    /// Tunnel silence after which [`Event::TunnelDead`](super::Event::TunnelDead) fires (default 60
    /// s).
    pub read_deadline: Duration,
    /// Compat wire mode: how long one stream may keep the tunnel reader paused (because its upstream takes nothing)
    /// before that stream alone is closed with a reason and the others resume (default 30 s).
    /// A paused reader never counts as a silent tunnel.
    pub pause_limit: Duration,
    /// Tether protocol extensions the agent offers in `register` (start ack with subprotocol, close
    /// code and reason, error status). Each is used only if offered here *and* advertised by the
    /// control plane in `register_success`; a PipeOps control plane advertises none (default: all).
    pub extensions: Extensions,
    /// Bytes all streams may queue toward the control plane together (default 64 MiB); see
    /// [`crate::budget`].
    pub global_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ring_bytes: DEFAULT_RING_BYTES,
            max_message: DEFAULT_MAX_MESSAGE,
            dial_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            read_deadline: Duration::from_secs(60),
            pause_limit: Duration::from_secs(30),
            extensions: Extensions::ALL,
            global_bytes: DEFAULT_GLOBAL_BYTES,
        }
    }
}
