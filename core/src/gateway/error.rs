//! Errors of the gateway's input calls: one small `Copy` enum per operation.

use crate::credit::{AckError, CreditError};
use crate::wire::native::{FrameKind, NativeError};
use core::fmt;

use crate::relay::RequestError;
use crate::stream_id::StreamIdError;
use crate::wire::error::{DecodeError, EncodeError, FrameError};

/// Why [`Gateway::handle_tunnel_message`](super::Gateway::handle_tunnel_message) refused an agent
/// message.
///
/// [`Blocked`](Self::Blocked) and [`ScratchTooSmall`](Self::ScratchTooSmall) mean "not consumed:
/// hand the same message in again later". Every other variant means the message was consumed and
/// rejected: a warning naming the stream (or request id) was logged, an `error` reply is queued for
/// the agent when the message itself was malformed, and nothing else changed (other streams, their
/// queued data and their order are untouched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TunnelError {
    /// The message cannot be taken now (its stream's ring toward the client, or the reply queue, is
    /// full). Not consumed: stop reading the tunnel and hand the same message in again after
    /// [`Event::ResumeTunnelReads`](super::Event::ResumeTunnelReads).
    Blocked,
    /// The scratch buffer cannot hold the decoded data. Not consumed; a caller bug (give a scratch of
    /// at least [`Config::max_message`](super::Config::max_message) bytes).
    ScratchTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The message is larger than the limit; its stream, if any, is closed with code 1009.
    TooLarge {
        /// Size of the message.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message buffer type refused a payload of `len` bytes; its stream is closed with 1009.
    PayloadRefused {
        /// Payload size.
        len: usize,
    },
    /// The envelope is not valid JSON, or lacks or mistypes a field.
    Decode(DecodeError),
    /// The data frame is bad: invalid base64, empty, unknown opcode, bad close payload.
    Frame(FrameError),
    /// The message type is not one a control plane knows.
    UnknownType,
    /// No live stream or request has this id.
    UnknownStream,
    /// The message does not fit its stream: a response message for a WebSocket stream (or the
    /// reverse), or a second start acknowledgement or response header.
    Unexpected,
    /// A native frame is malformed (native mode only).
    Native(NativeError),
    /// A native frame of a kind only the control plane sends (`start`) came from the agent.
    UnexpectedFrame(FrameKind),
    /// Data arrived for a stream whose sender had no credit left (native mode): the stream is
    /// closed with 1008, others are untouched.
    Credit(CreditError),
    /// A native ack reported bytes that were never sent (or fewer than before): the peer is
    /// broken; the ack is ignored, every stream goes on.
    Ack(AckError),
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blocked => f.write_str("gateway is full; message not consumed"),
            Self::ScratchTooSmall { needed } => {
                write!(f, "scratch buffer too small: {needed} bytes needed")
            }
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
            Self::PayloadRefused { len } => {
                write!(
                    f,
                    "message of {len} bytes is too large for this control plane"
                )
            }
            Self::Decode(e) => write!(f, "invalid message: {e}"),
            Self::Frame(e) => write!(f, "invalid data frame: {e}"),
            Self::UnknownType => f.write_str("unknown message type"),
            Self::UnknownStream => f.write_str("unknown stream id"),
            Self::Unexpected => f.write_str("message does not fit the stream's state or kind"),
            Self::Native(e) => write!(f, "invalid native frame: {e}"),
            Self::UnexpectedFrame(kind) => {
                write!(f, "native {kind} frame is not sent to a control plane")
            }
            Self::Credit(e) => fmt::Display::fmt(e, f),
            Self::Ack(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl core::error::Error for TunnelError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Decode(e) => Some(e),
            Self::Frame(e) => Some(e),
            Self::Native(e) => Some(e),
            Self::Credit(e) => Some(e),
            Self::Ack(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DecodeError> for TunnelError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::TooLarge { len, max } => Self::TooLarge { len, max },
            e => Self::Decode(e),
        }
    }
}

impl From<FrameError> for TunnelError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::BufferTooSmall { needed } => Self::ScratchTooSmall { needed },
            e => Self::Frame(e),
        }
    }
}

/// Why [`Gateway::open_stream`](super::Gateway::open_stream) or
/// [`Gateway::open_request`](super::Gateway::open_request) refused; nothing was registered or queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OpenError {
    /// The agent has not registered on this tunnel yet (or the tunnel is gone).
    NotRegistered,
    /// A live stream already has this id; it is untouched.
    DuplicateStream,
    /// Every stream slot is taken.
    TooManyStreams,
    /// The stream id is empty, too long or has control characters.
    StreamId(StreamIdError),
    /// The path, query, a header or a subprotocol is refused (see [`RequestError`]).
    Request(RequestError),
    /// The method is not an HTTP token.
    Method,
    /// The encoded start message needs `needed` bytes: more than the scratch buffer or
    /// [`Config::max_message`](super::Config::max_message).
    TooLarge {
        /// Bytes needed.
        needed: usize,
    },
    /// The message buffer type refused the encoded start of `len` bytes.
    PayloadRefused {
        /// Size.
        len: usize,
    },
    /// The start could not be encoded (e.g. the Unix time is out of range).
    Encode(EncodeError),
    /// A TCP stream's host is not a valid dial target or its port is 0.
    TcpTarget,
    /// A raw upgrade (e.g. SPDY) on a tunnel whose agent did not offer
    /// [`Extensions::raw_upgrade`](crate::wire::Extensions::raw_upgrade) (a PipeOps agent).
    UpgradeUnsupported,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRegistered => f.write_str("no registered agent on this tunnel"),
            Self::DuplicateStream => f.write_str("duplicate stream id"),
            Self::TooManyStreams => f.write_str(
                "every stream slot of this cluster's tunnel is in use (the per-cluster limit); try again later",
            ),
            Self::StreamId(e) => write!(f, "invalid stream id: {e}"),
            Self::Request(e) => fmt::Display::fmt(e, f),
            Self::Method => f.write_str("invalid method"),
            Self::TooLarge { needed } => write!(f, "request too large: {needed} bytes encoded"),
            Self::PayloadRefused { len } => write!(f, "request of {len} bytes refused"),
            Self::Encode(e) => fmt::Display::fmt(e, f),
            Self::TcpTarget => f.write_str("invalid tcp target (host or port)"),
            Self::UpgradeUnsupported => {
                f.write_str("this agent cannot carry raw (non-WebSocket) upgrades")
            }
        }
    }
}

impl core::error::Error for OpenError {}

impl From<RequestError> for OpenError {
    fn from(e: RequestError) -> Self {
        Self::Request(e)
    }
}

impl From<StreamIdError> for OpenError {
    fn from(e: StreamIdError) -> Self {
        Self::StreamId(e)
    }
}

/// Why [`Gateway::handle_client_closed`](super::Gateway::handle_client_closed) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ClientError {
    /// No live stream has this id (it may have ended and been freed already).
    UnknownStream,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown stream id")
    }
}

impl core::error::Error for ClientError {}
