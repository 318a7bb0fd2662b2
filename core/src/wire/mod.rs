//! Compat wire codecs: the PipeOps JSON envelope and the base64 data frames.
//!
//! * [`json`]: zero-copy validating JSON reader and a writer into caller buffers.
//! * [`Envelope`] + [`Inbound`]: decode every control-plane → agent message into borrowed
//!   views ([`Envelope::parse`], then [`Envelope::inbound`]).
//! * [`Outbound`]: encode every agent → control-plane message into a caller buffer.
//! * [`DataFrame`]: `[opcode][payload]` ⇄ standard base64, into caller buffers; [`b64`] has
//!   the length math.
//! * [`UnixTime`]: caller-supplied time and its RFC 3339 form.
//! * [`native`]: the native wire mode's binary frames ([`NativeFrame`]), used once both ends
//!   advertise [`Extensions::native`].
//!
//! Nothing here allocates or reads a clock. Inbound views borrow the received frame; outbound
//! encoders borrow their inputs and write each byte of output once.
//!
//! The reverse direction (a control plane decoding agent messages and encoding its own) is in
//! [`control`]: [`Envelope::agent_message`] and [`ControlMessage`], built from the same
//! envelope, field readers ([`envelope`]) and [`json::JsonWriter`].

pub mod b64;
pub mod control;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod headers;
pub mod inbound;
pub mod json;
pub mod native;
pub mod outbound;
pub mod timestamp;

pub use b64::Base64Str;
pub use control::{AgentMessage, ControlMessage};
pub use envelope::{Envelope, Extensions, Limits};
pub use error::{BufferTooSmall, DecodeError, EncodeError, FrameError, JsonError, TimestampError};
pub use frame::{CloseFrame, DataFrame, MAX_CONTROL_PAYLOAD, Opcode};
pub use headers::{HeaderList, HeaderValues, Headers};
pub use inbound::{
    Body, GatewayHello, INBOUND_TYPE_NAMES, Inbound, ProxyRequest, RegisterSuccess, TcpTunnelStart,
    UdpTunnelData, WebSocketClose, WebSocketData, WebSocketStart,
};
pub use json::{JsonStr, WireStr};
pub use native::{DataKind, FrameKind, NativeError, NativeFrame, StartRequest};
pub use outbound::{
    Features, HEARTBEAT_DRAINING, Heartbeat, Outbound, ProtocolFallback, Register, TcpTunnelClose,
    TunnelPorts,
};
pub use timestamp::UnixTime;

#[cfg(test)]
mod tests;
