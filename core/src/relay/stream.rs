//! Per-stream relay state: the two rings and what is still owed to each side.

use heapless::String;

use crate::engine::{Carries, Pipe};
use crate::ring::Payload;
use crate::time::Instant;

use super::event::{Close, MAX_FAILURE_MESSAGE, MAX_SUBPROTOCOL};
use super::tcp::TcpData;

/// Upstream refusal to report as `proxy_error`.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) status: u16,
    pub(crate) message: String<MAX_FAILURE_MESSAGE>,
}

/// What a stream carries. One field for both so a slot pays for the larger only.
#[derive(Debug)]
pub(crate) enum Kind {
    /// A WebSocket stream (`proxy_websocket_*`).
    WebSocket {
        /// Negotiated subprotocol, for the start acknowledgement.
        subprotocol: String<MAX_SUBPROTOCOL>,
    },
    /// A raw TCP tunnel (`tcp_tunnel_*`).
    Tcp(TcpData),
}

/// Everything the relay keeps for one stream besides its id and lifecycle state: its data path
/// ([`Pipe`]: toward the tunnel is what the upstream sent, the local end is the upstream) and
/// what the agent role still owes each side.
///
/// Size: two rings (`2 * (RING * size_of::<Message<M>>() + 32)` bytes) plus about 420 bytes of
/// fixed-size strings for the subprotocol, a failure message and two close reasons.
#[derive(Debug)]
pub(crate) struct StreamData<M, const RING: usize> {
    /// The rings, credit and read state shared with the control-plane role.
    pub(crate) pipe: Pipe<M, RING>,
    /// WebSocket stream (with its negotiated subprotocol) or raw TCP tunnel.
    pub(crate) kind: Kind,
    /// A start acknowledgement is owed to the control plane.
    pub(crate) owe_started: bool,
    /// A `proxy_error` for a refused dial is owed to the control plane.
    pub(crate) owe_failed: Option<Failure>,
    /// A close is owed to the control plane, after the ring toward the tunnel drains.
    pub(crate) owe_close: Option<Close>,
    /// A `CloseUpstream` event is owed to the adapter, after the ring toward it drains.
    pub(crate) owe_close_upstream: Option<Close>,
    /// The adapter holds (or is dialling) an upstream connection it has not reported closed.
    pub(crate) upstream_alive: bool,
    /// A close for this stream was queued to the control plane (sent at most once).
    pub(crate) tunnel_closed: bool,
    /// The tunnel this stream belonged to is gone: nothing more is sent for it.
    pub(crate) tunnel_gone: bool,
    /// Dial deadline while opening; close deadline while waiting for the upstream to close.
    pub(crate) deadline: Option<Instant>,
}

impl<M, const RING: usize> Carries<M, RING> for StreamData<M, RING> {
    fn pipe(&self) -> &Pipe<M, RING> {
        &self.pipe
    }
    fn pipe_mut(&mut self) -> &mut Pipe<M, RING> {
        &mut self.pipe
    }
}

impl<M: Payload, const RING: usize> StreamData<M, RING> {
    pub(crate) const fn new(ring_bytes: usize, dial_deadline: Instant) -> Self {
        Self {
            pipe: Pipe::new(ring_bytes),
            kind: Kind::WebSocket {
                subprotocol: String::new(),
            },
            owe_started: false,
            owe_failed: None,
            owe_close: None,
            owe_close_upstream: None,
            upstream_alive: true,
            tunnel_closed: false,
            tunnel_gone: false,
            deadline: Some(dial_deadline),
        }
    }

    /// Whether the stream speaks the native wire mode.
    pub(crate) const fn is_native(&self) -> bool {
        self.pipe.is_native()
    }

    /// Whether this is a raw TCP tunnel.
    pub(crate) const fn is_tcp(&self) -> bool {
        matches!(self.kind, Kind::Tcp(_))
    }

    /// The TCP tunnel bookkeeping, for a tunnel.
    pub(crate) fn tcp_mut(&mut self) -> Option<&mut TcpData> {
        match &mut self.kind {
            Kind::Tcp(tcp) => Some(tcp),
            Kind::WebSocket { .. } => None,
        }
    }

    /// The negotiated subprotocol of a WebSocket stream (empty for none, and for tunnels).
    pub(crate) fn subprotocol(&self) -> &str {
        match &self.kind {
            Kind::WebSocket { subprotocol } => subprotocol.as_str(),
            Kind::Tcp(_) => "",
        }
    }

    /// Whether nothing is owed to either side any more (the stream may be freed once closing).
    pub(crate) fn is_settled(&self) -> bool {
        !self.owe_started
            && self.owe_failed.is_none()
            && self.owe_close.is_none()
            && self.owe_close_upstream.is_none()
            && !self.upstream_alive
            && self.pipe.to_tunnel.is_empty()
    }
}
