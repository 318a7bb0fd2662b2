//! What the relay hands to its adapter: messages, the buffer trait they live in, and events.

use core::fmt;

use heapless::String;

use crate::ring::Payload;
use crate::stream_id::StreamId;
use crate::wire::{Extensions, Opcode};

/// Longest close reason carried (RFC 6455 limits a close payload to 125 bytes, 2 of them the code).
pub const MAX_CLOSE_REASON: usize = 123;

/// Longest negotiated subprotocol kept for the start acknowledgement.
pub const MAX_SUBPROTOCOL: usize = 64;

/// Longest upstream failure message kept for the `proxy_error`.
pub const MAX_FAILURE_MESSAGE: usize = 128;

/// An owned message buffer the adapter chooses: the core never allocates, it asks `M` to copy.
///
/// The tokio agent uses an owned heap buffer; an embedded target uses `heapless::Vec<u8, N>` (which
/// implements this trait), `N` then being its largest message.
pub trait PayloadBuf: Payload + Sized {
    /// A buffer holding a copy of `bytes`, or `None` if `bytes` does not fit this buffer type.
    fn from_slice(bytes: &[u8]) -> Option<Self>;

    /// The bytes held.
    fn as_bytes(&self) -> &[u8];

    /// The bytes from `start` on, as a buffer: `None` when `start` is past the end or the rest
    /// does not fit. The default copies; a reference-counted buffer overrides it to share.
    fn sliced(self, start: usize) -> Option<Self> {
        Self::from_slice(self.as_bytes().get(start..)?)
    }

    /// The largest payload [`from_slice`](Self::from_slice) takes. Byte streams (TCP tunnels)
    /// are split into pieces of at most this size; unbounded by default.
    fn max_len() -> usize {
        usize::MAX
    }
}

impl<const N: usize> PayloadBuf for heapless::Vec<u8, N> {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        Self::from_slice(bytes).ok()
    }

    fn as_bytes(&self) -> &[u8] {
        self.as_slice()
    }

    fn max_len() -> usize {
        N
    }
}

/// One tunnel message from [`Relay::poll_transmit_owned`](super::Relay::poll_transmit_owned) or
/// [`Gateway::poll_transmit_owned`](crate::gateway::Gateway::poll_transmit_owned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit<M> {
    /// A message encoded into the caller's buffer: its length. A native frame iff
    /// [`is_native`](crate::wire::native::is_native) says so (send it as a binary message), a JSON
    /// envelope otherwise (send it as text).
    Encoded(usize),
    /// A native data frame: send `header` followed by `payload` as one binary message.
    Data {
        /// The frame header ([`data_header`](crate::wire::native::data_header)).
        header: [u8; crate::wire::native::HEADER_LEN],
        /// The message payload, as queued.
        payload: M,
    },
}

/// Kind of a data message: the WebSocket opcodes that carry data. Control frames never travel as
/// messages (closes are events, pings are answered per hop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MessageKind {
    /// WebSocket text message.
    Text,
    /// WebSocket binary message.
    Binary,
}

impl From<MessageKind> for crate::wire::native::DataKind {
    fn from(kind: MessageKind) -> Self {
        match kind {
            MessageKind::Text => Self::Text,
            MessageKind::Binary => Self::Binary,
        }
    }
}

impl From<crate::wire::native::DataKind> for MessageKind {
    fn from(kind: crate::wire::native::DataKind) -> Self {
        match kind {
            crate::wire::native::DataKind::Text => Self::Text,
            crate::wire::native::DataKind::Binary => Self::Binary,
        }
    }
}

impl From<MessageKind> for Opcode {
    fn from(kind: MessageKind) -> Self {
        match kind {
            MessageKind::Text => Self::Text,
            MessageKind::Binary => Self::Binary,
        }
    }
}

/// One whole WebSocket data message: kind and payload, boundaries intact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Message<M> {
    /// Text or binary.
    pub kind: MessageKind,
    /// The payload.
    pub payload: M,
}

impl<M: Payload> Payload for Message<M> {
    fn len(&self) -> usize {
        self.payload.len()
    }
}

/// A close code and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Close {
    /// WebSocket close code (1000 normal, 1001 going away, 1009 too big, 1011 error, ...).
    pub code: u16,
    /// Reason, at most [`MAX_CLOSE_REASON`] bytes (longer reasons are cut at a character boundary).
    pub reason: String<MAX_CLOSE_REASON>,
}

impl Close {
    /// A close with `code` and `reason` (cut to [`MAX_CLOSE_REASON`] bytes).
    #[must_use]
    pub fn new(code: u16, reason: &str) -> Self {
        Self {
            code,
            reason: truncated(reason.chars()),
        }
    }
}

impl Close {
    /// Whether `code` may be sent in a WebSocket close frame (RFC 6455 §7.4: 1000-1003,
    /// 1007-1014, 3000-4999). 1005, 1006 and 1015 only describe a close that carried no frame.
    #[must_use]
    pub const fn is_sendable(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.code, self.reason.as_str())
    }
}

pub(crate) use crate::text::truncated;

/// Something the adapter must act on. Poll with [`Relay::poll_event`](super::Relay::poll_event).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Event {
    /// The control plane accepted the registration.
    Registered {
        /// Cluster id it assigned (cut to 64 bytes).
        cluster_id: String<64>,
        /// Tether extensions in use on this session (offered by both sides).
        extensions: Extensions,
    },
    /// Send a WebSocket ping on the tunnel now.
    SendPing,
    /// The tunnel was silent past the read deadline: drop the connection and call
    /// [`Relay::handle_tunnel_lost`](super::Relay::handle_tunnel_lost).
    TunnelDead,
    /// Stop reading the tunnel: a message was refused with
    /// [`TunnelError::Blocked`](super::TunnelError::Blocked). Head-of-line blocking for every
    /// stream (compat mode has no per-stream flow control); counted in
    /// [`Stats::tunnel_pauses`](super::Stats).
    PauseTunnelReads,
    /// Reading the tunnel may resume: hand in the refused message again first.
    ResumeTunnelReads,
    /// The stream's ring toward the upstream went from empty to non-empty: call
    /// [`Relay::pop_upstream`](super::Relay::pop_upstream) until it returns `None`, writing each
    /// message to the upstream WebSocket. The next `DataForUpstream` for this stream comes only
    /// after the ring was drained.
    DataForUpstream(StreamId),
    /// Close the upstream WebSocket with this code and reason (or abandon the dial if it is still
    /// opening), then report it with
    /// [`Relay::handle_upstream_closed`](super::Relay::handle_upstream_closed). Every message for
    /// the stream was popped before this event. The code is [sendable](Close::is_sendable): an
    /// unsendable code from the control plane (e.g. 1005) is replaced by 1000.
    CloseUpstream {
        /// The stream.
        stream: StreamId,
        /// Code and reason to close with.
        close: Close,
    },
    /// The stream's ring toward the tunnel is full: stop reading this upstream socket.
    StopReadingUpstream(StreamId),
    /// The stream's ring toward the tunnel drained below half: reading may resume (hand in a
    /// refused message first).
    ResumeReadingUpstream(StreamId),
}
