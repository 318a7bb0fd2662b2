//! What the gateway hands to its adapter: events, handled-message results, counters.

use heapless::String;

use crate::relay::{Close, MAX_FAILURE_MESSAGE, MAX_SUBPROTOCOL};
use crate::stream_id::StreamId;
use crate::wire::{AgentMessage, Envelope, Extensions, Headers};

/// Something the adapter must act on. Poll with [`Gateway::poll_event`](super::Gateway::poll_event).
///
/// Per stream, events come in this order: at most one of [`Started`](Self::Started) /
/// [`Failed`](Self::Failed); then [`DataForClient`](Self::DataForClient) as data arrives; then exactly
/// one terminal event ([`Closed`](Self::Closed), [`ResponseEnd`](Self::ResponseEnd),
/// [`ResponseAbort`](Self::ResponseAbort) or `Failed`) once every message was popped. After the
/// terminal event the stream is gone: end the client connection.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Event {
    /// The agent registered and got `register_success`: the tunnel may carry streams now.
    Registered {
        /// The agent's `agent_id` (cut to 64 bytes; empty when it sent none).
        agent_id: String<64>,
        /// Tether extensions in use on this tunnel (offered by both sides).
        extensions: Extensions,
    },
    /// The agent is shutting down (its heartbeat said `draining`): open no new stream on this
    /// tunnel while the cluster has another; the live ones carry on. Comes once per tunnel.
    AgentDraining,
    /// Send a WebSocket ping on the tunnel now.
    SendPing,
    /// The tunnel was silent past the read deadline: drop the connection and call
    /// [`Gateway::handle_tunnel_lost`](super::Gateway::handle_tunnel_lost).
    TunnelDead,
    /// Stop reading the tunnel: a message was refused with
    /// [`TunnelError::Blocked`](super::TunnelError::Blocked) (head-of-line blocking in compat mode,
    /// counted in [`Stats::tunnel_pauses`]).
    PauseTunnelReads,
    /// Reading the tunnel may resume: hand in the refused message again first.
    ResumeTunnelReads,
    /// The upstream accepted the WebSocket stream: answer the client's upgrade with 101 and this
    /// subprotocol (none when empty). For an agent without the `websocket_started` extension this
    /// comes at once, with the first subprotocol the client offered. A TCP stream gets it at once,
    /// with no subprotocol.
    Started {
        /// The stream.
        stream: StreamId,
        /// Negotiated subprotocol.
        subprotocol: String<MAX_SUBPROTOCOL>,
    },
    /// The stream or request failed before it started: answer the client with this HTTP status
    /// (the upstream's own status when the agent reported it, 502 otherwise, 504 on timeout).
    /// Terminal.
    Failed {
        /// The stream.
        stream: StreamId,
        /// HTTP status for the client.
        status: u16,
        /// Why.
        message: String<MAX_FAILURE_MESSAGE>,
    },
    /// The stream's ring toward the client went from empty to non-empty: call
    /// [`Gateway::pop_client`](super::Gateway::pop_client) until `None`, writing each message to the
    /// client (WebSocket messages with their kind; response body chunks for requests).
    DataForClient(StreamId),
    /// The WebSocket stream ended from the agent's side: close the client WebSocket with this code
    /// and reason. Every message was popped before. Terminal. For a TCP stream: close the socket
    /// (1000: the service closed; otherwise an error, e.g. `connection_failed: ...`).
    Closed {
        /// The stream.
        stream: StreamId,
        /// Code and reason.
        close: Close,
    },
    /// The response body is complete: finish the client's response. Terminal.
    ResponseEnd(StreamId),
    /// The response broke off after its header: abort the client's response (do not finish the
    /// chunked body cleanly). Terminal.
    ResponseAbort {
        /// The request.
        stream: StreamId,
        /// Why.
        message: String<MAX_FAILURE_MESSAGE>,
    },
    /// The stream's ring toward the agent is full: stop reading this client.
    StopReadingClient(StreamId),
    /// The stream's ring toward the agent drained below half: reading this client may resume (hand
    /// in the refused message first).
    ResumeReadingClient(StreamId),
}

/// The start of a response: status and headers to send to the client, borrowed from the agent's
/// message. The body follows as [`Event::DataForClient`] messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    /// The request.
    pub stream: StreamId,
    /// HTTP status.
    pub status: u16,
    /// Upstream response headers, shape-validated only: the adapter must still drop hop-by-hop
    /// headers and refuse names or values that are not valid HTTP.
    pub headers: Headers<'a>,
    /// The body bytes are gzip-compressed (a buffered `proxy_response` with `encoding: "gzip"`).
    pub gzip: bool,
}

/// What [`Gateway::handle_tunnel_message`](super::Gateway::handle_tunnel_message) did with a message.
// Borrowed views returned by value, consumed at once; no allocator to box the large variant.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled<'a> {
    /// Consumed; only the `poll_*` outputs may have changed.
    Consumed,
    /// A response header for a request: send it to the client now, before handling the next event.
    ResponseHead(ResponseHead<'a>),
    /// A message the gateway does not act on (backpressure, protocol_fallback, gateway_hello_ack, UDP
    /// tunnel messages): up to the adapter, typically logged.
    Other(Envelope<'a>, AgentMessage<'a>),
}

/// Counters for metrics. Monotonic for the life of the gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// WebSocket streams opened.
    pub streams_opened: u64,
    /// HTTP requests opened.
    pub requests_opened: u64,
    /// Streams and requests finished and freed.
    pub streams_closed: u64,
    /// Streams and requests that failed before starting (refused, timed out, tunnel lost).
    pub streams_failed: u64,
    /// Times the tunnel reader was paused (head-of-line blocking in compat mode).
    pub tunnel_pauses: u64,
    /// Streams closed because their client kept the tunnel paused past the pause limit.
    pub stalled_streams_closed: u64,
    /// Agent messages rejected with an error.
    pub bad_messages: u64,
    /// Ping/pong data frames from the agent, dropped (pings are answered per hop).
    pub control_frames_dropped: u64,
    /// Messages for a recently finished stream, dropped quietly.
    pub late_messages: u64,
    /// Queued messages discarded because their destination went away first.
    pub discarded_messages: u64,
    /// Payload bytes sent toward the agent (client data and request bodies).
    pub bytes_to_agent: u64,
    /// Payload bytes handed to clients (WebSocket data and response bodies).
    pub bytes_to_client: u64,
    /// Times a native stream had data for the agent and no credit (the agent's upstream was
    /// slower than the client).
    pub credit_stalls: u64,
    /// Total time native streams spent with data for the agent and no credit, in microseconds.
    pub credit_blocked_micros: u64,
}
