//! Per-stream gateway state: the two rings and what is still owed to each side.

use heapless::String;

use crate::credit::Credit;
use crate::relay::{Close, MAX_FAILURE_MESSAGE, MAX_SUBPROTOCOL, Message};
use crate::ring::{Payload, Ring};
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

pub(crate) use crate::flow::Flow;

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
    /// The encoded start (`proxy_websocket_start` / `proxy_request`), owed to the tunnel.
    pub(crate) start: Option<M>,
    /// Client -> agent messages, drained by `poll_transmit`.
    pub(crate) to_agent: Ring<Message<M>, RING>,
    /// Agent -> client messages, popped by the adapter.
    pub(crate) to_client: Ring<Message<M>, RING>,
    /// `Started` owed to the client, with the subprotocol.
    pub(crate) owe_started: Option<String<MAX_SUBPROTOCOL>>,
    /// `Failed` owed to the client.
    pub(crate) owe_failed: Option<Failure>,
    /// Terminal event owed to the client after `to_client` drains.
    pub(crate) owe_client_end: Option<ClientEnd>,
    /// `proxy_websocket_close` owed to the agent after `to_agent` drains.
    pub(crate) owe_agent_close: Option<Close>,
    /// `proxy_cancel` owed to the agent.
    pub(crate) owe_cancel: bool,
    /// The client may still get events and data.
    pub(crate) client_alive: bool,
    /// The agent side has not ended (and we have not ended it).
    pub(crate) agent_alive: bool,
    /// A `DataForClient` event is owed.
    pub(crate) owe_readable: bool,
    /// The adapter was told to stop reading the client.
    pub(crate) reading_stopped: bool,
    /// A pending stop/resume-reading notice.
    pub(crate) flow: Option<Flow>,
    /// Start deadline while opening.
    pub(crate) deadline: Option<Instant>,
    /// The stream's number on the tunnel in native mode; 0 for a compat stream.
    pub(crate) wire: u32,
    /// Credit windows (native mode, and requests with `response_credit`).
    pub(crate) credit: Credit,
    /// A request whose response body the agent sends only within `credit` (extension
    /// `response_credit`): its client's stall holds only it.
    pub(crate) response_credit: bool,
    /// Reading the client was stopped by the shared budget ([`crate::budget`]).
    pub(crate) budget_stopped: bool,
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
            to_agent: Ring::new(ring_bytes),
            to_client: Ring::new(ring_bytes),
            owe_started: None,
            owe_failed: None,
            owe_client_end: None,
            owe_agent_close: None,
            owe_cancel: false,
            client_alive: true,
            agent_alive: true,
            owe_readable: false,
            reading_stopped: false,
            flow: None,
            deadline: Some(deadline),
            wire: 0,
            credit: Credit::ZERO,
            response_credit: false,
            budget_stopped: false,
        }
    }

    /// Whether data toward the client is bounded by credit (not by pausing the tunnel).
    pub(crate) const fn is_credited(&self) -> bool {
        self.wire != 0 || self.response_credit
    }

    /// Whether the stream speaks the native wire mode.
    pub(crate) const fn is_native(&self) -> bool {
        self.wire != 0
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
