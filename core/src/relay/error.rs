//! Errors of the relay's input calls: one small enum per operation.

use core::fmt;

use crate::credit::{AckError, CreditError};
use crate::stream_id::StreamIdError;
use crate::table::TransitionError;
use crate::wire::error::{DecodeError, EncodeError, FrameError};
use crate::wire::native::{FrameKind, NativeError};

use super::validate::RequestError;

/// Why [`Relay::handle_tunnel_message`](super::Relay::handle_tunnel_message) refused a tunnel
/// message.
///
/// Two variants mean "not consumed, hand the same message in again later":
/// [`Blocked`](Self::Blocked) and [`ScratchTooSmall`](Self::ScratchTooSmall). Every other variant
/// means the message was consumed and rejected: a `proxy_error` naming the stream (or request) is
/// queued for the control plane, a line is logged, and nothing else changed (no other stream is
/// touched, no queued byte is lost).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TunnelError {
    /// The message cannot be taken now (its stream's ring toward the upstream, or the reply queue,
    /// is full). Not consumed: stop reading the tunnel and hand the same message in again after
    /// [`Event::ResumeTunnelReads`](super::Event::ResumeTunnelReads).
    Blocked,
    /// The scratch buffer cannot hold the decoded data frame. Not consumed; a caller bug (give a
    /// scratch of at least [`Config::max_message`](super::Config::max_message) bytes).
    ScratchTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The message, or the data it carries, is larger than the limit; its stream, if any, is closed
    /// with code 1009.
    TooLarge {
        /// Size of the message or its data.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message buffer type refused to hold a data message of `len` bytes
    /// ([`PayloadBuf::from_slice`](super::PayloadBuf::from_slice) returned `None`); its stream is
    /// closed with code 1009.
    PayloadRefused {
        /// Payload size.
        len: usize,
    },
    /// The envelope is not valid JSON, or lacks or mistypes a field.
    Decode(DecodeError),
    /// The data frame is bad: invalid base64, empty, unknown opcode, bad close payload.
    Frame(FrameError),
    /// The message type is not one the agent knows; `protocol_fallback` was sent (once per type).
    UnknownType,
    /// No live stream has this id.
    UnknownStream,
    /// A live stream already has this id; the live stream is untouched.
    DuplicateStream,
    /// Every stream slot is taken.
    TooManyStreams,
    /// The stream id is empty, too long or has control characters.
    StreamId(StreamIdError),
    /// The start request's path, query, headers or subprotocols are refused.
    Request(RequestError),
    /// A native frame is malformed (native mode only).
    Native(NativeError),
    /// A native frame of a kind only the agent sends (`started`, `error`) came from the control
    /// plane.
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
            Self::Blocked => f.write_str("relay is full; message not consumed"),
            Self::ScratchTooSmall { needed } => {
                write!(f, "scratch buffer too small: {needed} bytes needed")
            }
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
            Self::PayloadRefused { len } => {
                write!(f, "message of {len} bytes is too large for this agent")
            }
            Self::Decode(e) => write!(f, "invalid message: {e}"),
            Self::Frame(e) => write!(f, "invalid data frame: {e}"),
            Self::UnknownType => f.write_str("unknown message type"),
            Self::UnknownStream => f.write_str("unknown stream id"),
            Self::DuplicateStream => {
                f.write_str("duplicate stream id: a stream with this id is already open")
            }
            Self::TooManyStreams => f.write_str("too many streams"),
            Self::StreamId(e) => write!(f, "invalid stream id: {e}"),
            Self::Request(e) => fmt::Display::fmt(e, f),
            Self::Native(e) => write!(f, "invalid native frame: {e}"),
            Self::UnexpectedFrame(kind) => {
                write!(f, "native {kind} frame is not sent to an agent")
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
            Self::StreamId(e) => Some(e),
            Self::Request(e) => Some(e),
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

impl From<StreamIdError> for TunnelError {
    fn from(e: StreamIdError) -> Self {
        Self::StreamId(e)
    }
}

impl From<RequestError> for TunnelError {
    fn from(e: RequestError) -> Self {
        Self::Request(e)
    }
}

/// Why an upstream notification (`handle_upstream_started/failed/closed`) was refused; the relay is
/// unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum UpstreamError {
    /// No live stream has this id (it may have been closed and freed already).
    UnknownStream,
    /// The stream is not in a state where this notification makes sense.
    Transition(TransitionError),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownStream => f.write_str("unknown stream id"),
            Self::Transition(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl core::error::Error for UpstreamError {}

impl From<TransitionError> for UpstreamError {
    fn from(e: TransitionError) -> Self {
        Self::Transition(e)
    }
}

/// Why [`Relay::handle_upstream_message`](super::Relay::handle_upstream_message) refused a message;
/// the message is handed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SendError<M> {
    /// The stream's ring toward the tunnel is full: keep the message, stop reading this upstream,
    /// and hand it in again after
    /// [`Event::ResumeReadingUpstream`](super::Event::ResumeReadingUpstream).
    Full(M),
    /// No live stream has this id, or its upstream side is closed: the message has nowhere to go.
    Closed(M),
    /// The message is larger than [`Config::max_message`](super::Config::max_message); the stream
    /// is left as it is (the adapter should cap its upstream reader at that size and close the
    /// stream).
    TooLarge(M),
}

impl<M> SendError<M> {
    /// The refused message.
    pub fn into_inner(self) -> M {
        match self {
            Self::Full(m) | Self::Closed(m) | Self::TooLarge(m) => m,
        }
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full(_) => "stream ring toward the tunnel is full",
            Self::Closed(_) => "stream is unknown or closed",
            Self::TooLarge(_) => "message exceeds the largest tunnel message",
        })
    }
}

impl<M: fmt::Debug> core::error::Error for SendError<M> {}

/// Why [`Relay::poll_transmit`](super::Relay::poll_transmit) could not produce a message; the
/// message stays queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TransmitError {
    /// The buffer is too small for the next message; `needed` is the exact size.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The message cannot be encoded (e.g. the Unix time is out of range).
    Encode(EncodeError),
}

impl fmt::Display for TransmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed } => {
                write!(f, "transmit buffer too small: {needed} bytes needed")
            }
            Self::Encode(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl core::error::Error for TransmitError {}

impl From<crate::wire::BufferTooSmall> for TransmitError {
    fn from(e: crate::wire::BufferTooSmall) -> Self {
        Self::BufferTooSmall { needed: e.needed }
    }
}

impl From<EncodeError> for TransmitError {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::BufferTooSmall { needed } => Self::BufferTooSmall { needed },
            e => Self::Encode(e),
        }
    }
}
