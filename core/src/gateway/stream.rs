//! Per-stream gateway state: the two rings and what is still owed to each side.

use heapless::String;

use crate::engine::{Carries, Pipe};
use crate::relay::{Close, MAX_FAILURE_MESSAGE, MAX_SUBPROTOCOL};
use crate::ring::Payload;
use crate::time::Instant;

/// What a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StreamKind {
    /// A kubectl WebSocket (`proxy_websocket_*`).
    WebSocket,
    /// A plain HTTP request (`proxy_request` / `proxy_response*`).
    Request,
    /// A raw TCP connection (`tcp_tunnel_*`), see [`Gateway::open_tcp`](super::Gateway::open_tcp).
    Tcp,
}

/// A refusal owed to the client as [`Event::Failed`](super::Event::Failed).
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) status: u16,
    pub(crate) message: String<MAX_FAILURE_MESSAGE>,
}

/// The terminal event owed to the client once its ring drains.
#[derive(Clone, Debug)]
pub(crate) enum ClientEnd {
    Close(Close),
    ResponseEnd,
    Abort(String<MAX_FAILURE_MESSAGE>),
}

/// Everything the gateway keeps for one stream besides its id and lifecycle state.
#[derive(Debug)]
pub(crate) struct StreamData<M, const RING: usize> {
    pub(crate) kind: StreamKind,
    /// The rings, credit and read state shared with the agent role (toward the tunnel is what
    /// the client sent; the local end is the client).
    pub(crate) pipe: Pipe<M, RING>,
    /// The encoded start (`proxy_websocket_start` / `proxy_request`), owed to the tunnel.
    pub(crate) start: Option<M>,
    /// `Started` owed to the client, with the subprotocol.
    pub(crate) owe_started: Option<String<MAX_SUBPROTOCOL>>,
    /// `Failed` owed to the client.
    pub(crate) owe_failed: Option<Failure>,
    /// Terminal event owed to the client after the ring toward the client drains.
    pub(crate) owe_client_end: Option<ClientEnd>,
    /// `proxy_websocket_close` owed to the agent after the ring toward the tunnel drains.
    pub(crate) owe_agent_close: Option<Close>,
    /// `proxy_cancel` owed to the agent.
    pub(crate) owe_cancel: bool,
    /// The client may still get events and data.
    pub(crate) client_alive: bool,
    /// The agent side has not ended (and we have not ended it).
    pub(crate) agent_alive: bool,
    /// Start deadline while opening.
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
    pub(crate) const fn new(
        kind: StreamKind,
        start: M,
        ring_bytes: usize,
        deadline: Instant,
    ) -> Self {
        Self {
            kind,
            start: Some(start),
            pipe: Pipe::new(ring_bytes),
            owe_started: None,
            owe_failed: None,
            owe_client_end: None,
            owe_agent_close: None,
            owe_cancel: false,
            client_alive: true,
            agent_alive: true,
            deadline: Some(deadline),
        }
    }

    /// Whether the stream speaks the native wire mode.
    pub(crate) const fn is_native(&self) -> bool {
        self.pipe.is_native()
    }

    /// Whether nothing is owed to either side any more (the stream may be freed once closing).
    pub(crate) fn is_settled(&self) -> bool {
        self.start.is_none()
            && self.owe_started.is_none()
            && self.owe_failed.is_none()
            && self.owe_client_end.is_none()
            && self.owe_agent_close.is_none()
            && !self.owe_cancel
            && !self.client_alive
            && !self.agent_alive
    }
}
