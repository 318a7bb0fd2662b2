//! Raw TCP streams: the control plane's side of `tcp_tunnel_start` / `tcp_tunnel_data` /
//! `tcp_tunnel_close` (the agent's side is [`crate::relay`]'s TCP tunnels).
//!
//! # Sequence
//!
//! The adapter accepts a TCP connection and calls [`open_tcp`](Gateway::open_tcp): the target is
//! validated, the stream registered and `tcp_tunnel_start {tunnel_id, service_name, service_port,
//! client_addr}` queued. The catalogue has no acknowledgement, so the stream is open at once:
//! [`Event::Started`](super::Event::Started) (empty subprotocol) follows, and the adapter starts
//! reading the socket. Bytes read go in with [`handle_client_message`](Gateway::handle_client_message)
//! (a [`MessageKind::Binary`] message per read) and leave as `tcp_tunnel_data`, in order; the
//! agent's `tcp_tunnel_data` come out as [`Event::DataForClient`](super::Event::DataForClient)
//! messages. Backpressure is the WebSocket streams': a full ring toward the agent hands the bytes
//! back with [`SendError::Full`](crate::relay::SendError::Full) and emits
//! [`Event::StopReadingClient`](super::Event::StopReadingClient); a full ring toward the socket
//! pauses the tunnel reader.
//!
//! # Closing
//!
//! * The socket ends: [`handle_client_closed`](Gateway::handle_client_closed) with code 1000 (EOF:
//!   `tcp_tunnel_close {reason: "client_closed"}`) or any other code with the error text as reason
//!   (`reason: "client_error", error`). Bytes already queued for the agent are sent first. The
//!   compat catalogue has no half-close: the agent closes its socket on it.
//! * The agent sends `tcp_tunnel_close`: every byte it sent before is delivered, then
//!   [`Event::Closed`](super::Event::Closed) with code 1000 for `service_closed`, 1011 otherwise
//!   (`connection_failed` when the agent could not dial, `read_error`, `write_error`,
//!   `protocol_error`, ...), the reason text being `reason` or `reason: error`. Close the socket.
//! * Undecodable `tcp_tunnel_data` leaves a hole in the byte stream: the stream is closed on both
//!   sides (1002) besides the `error` reply.

use heapless::String;

use super::{Gateway, OpenError, StreamData, StreamKind, TunnelError};
use crate::relay::{Close, MAX_CLOSE_REASON, MAX_TCP_HOST, MessageKind, PayloadBuf};
use crate::table::StreamState;
use crate::time::Instant;
use crate::wire::envelope::opt_str;
use crate::wire::{
    Base64Str, ControlMessage, DecodeError, Envelope, FrameError, JsonStr, UnixTime, WireStr,
};

use super::event::Handled;

/// A TCP connection to carry to `host:port` on the agent's side. See [`Gateway::open_tcp`].
#[derive(Debug, Clone, Copy)]
pub struct TcpOpen<'a> {
    /// Tunnel id, unique on this tunnel (same rules as a stream id).
    pub id: &'a str,
    /// Host the agent dials (`service_name`): 1 to 253 letters, digits and `.-_:[]`.
    pub host: &'a str,
    /// Port the agent dials (`service_port`), not 0.
    pub port: u16,
    /// Who connected, for the agent's logs (`client_addr`).
    pub client_addr: Option<&'a str>,
}

/// Largest piece of a TCP stream sent as one compat `tcp_tunnel_data`: what the smallest agent
/// takes whole (the microcontroller gateway's relay holds 8 slots of 512 bytes per stream).
pub const COMPAT_TCP_PIECE: usize = 4 * 1024;

/// Whether the agent's relay accepts `host` as a dial target (its own rule, see
/// [`crate::relay::TcpTunnelRequest::host`]).
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_TCP_HOST
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'))
}

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Gateway<M, STREAMS, RING> {
    /// Opens a raw TCP stream: validates `req`, registers the stream (open at once: the catalogue
    /// has no acknowledgement) and queues `tcp_tunnel_start` (encoded now into `scratch`).
    /// [`Event::Started`](super::Event::Started) follows. See the [module docs](self).
    ///
    /// # Errors
    /// [`OpenError`] ([`OpenError::TcpTarget`] for a bad host or port 0); nothing is registered or
    /// queued then.
    pub fn open_tcp(
        &mut self,
        now: Instant,
        unix_time: UnixTime,
        req: &TcpOpen<'_>,
        scratch: &mut [u8],
    ) -> Result<(), OpenError> {
        let id = self.check_open(req.id)?;
        if req.port == 0 || !valid_host(req.host) {
            return Err(OpenError::TcpTarget);
        }
        let ext = self.session.extensions;
        let wire = if ext.native && ext.native_tcp {
            let wire = self.session.last_wire.checked_add(1);
            Some(wire.ok_or(OpenError::TooManyStreams)?)
        } else {
            None
        };
        let message = ControlMessage::TcpTunnelStart {
            tunnel_id: WireStr::Plain(req.id),
            service_name: Some(WireStr::Plain(req.host)),
            service_port: req.port,
            client_addr: req.client_addr.map(WireStr::Plain),
            stream: wire,
        };
        let start = self.encode_start(&message, req.id, unix_time, scratch)?;
        let mut data = StreamData::new(StreamKind::Tcp, start, self.config.ring_bytes, now);
        data.deadline = None;
        data.owe_started = Some(String::new());
        if let Some(wire) = wire {
            data.pipe.go_native(wire, self.config.ring_bytes);
        }
        let slot = self.insert(id, data)?;
        if let Some(wire) = wire {
            self.session.last_wire = wire;
        }
        let _ = self.streams.transition(slot, StreamState::Open);
        self.stats.streams_opened += 1;
        info!("tunnel {}: start tcp {}:{}", req.id, req.host, req.port);
        Ok(())
    }

    /// The largest message [`handle_client_message`](Gateway::handle_client_message) should be
    /// given for a TCP stream on this tunnel:
    /// [`NATIVE_TCP_PIECE`](crate::wire::native::NATIVE_TCP_PIECE) when its bytes travel as
    /// native frames (extension `native_tcp`: the agent offered it because it takes such frames
    /// whole), [`COMPAT_TCP_PIECE`] otherwise.
    #[must_use]
    pub fn tcp_piece_len(&self) -> usize {
        let ext = self.session.extensions;
        if ext.native && ext.native_tcp {
            crate::wire::native::NATIVE_TCP_PIECE.min(self.config.max_message)
        } else {
            COMPAT_TCP_PIECE
        }
    }

    /// `tcp_tunnel_data` from the agent.
    pub(super) fn on_tcp_data<'a>(
        &mut self,
        env: &Envelope<'_>,
        data: Base64Str<'_>,
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let slot = match self.tcp_slot(env) {
            Ok(Some(slot)) => slot,
            Ok(None) => return Ok(Handled::Consumed),
            Err(e) => return Err(e),
        };
        let bytes = match data.decode_into(scratch) {
            Ok(bytes) => bytes,
            Err(FrameError::BufferTooSmall { needed }) => {
                return Err(TunnelError::ScratchTooSmall { needed });
            }
            Err(e) => {
                // A hole in a byte stream: it must not go on.
                self.close_both(slot, Close::new(1002, "invalid tcp_tunnel_data"));
                return Err(self.reject(tunnel_id(env), e.into(), true));
            }
        };
        if bytes.is_empty() {
            return Ok(Handled::Consumed);
        }
        self.push_client(slot, MessageKind::Binary, bytes)
    }

    /// `tcp_tunnel_close` from the agent.
    pub(super) fn on_tcp_close<'a>(
        &mut self,
        env: &Envelope<'_>,
        reason: Option<JsonStr<'_>>,
        error: Option<JsonStr<'_>>,
    ) -> Result<Handled<'a>, TunnelError> {
        let slot = match self.tcp_slot(env) {
            Ok(Some(slot)) => slot,
            Ok(None) => return Ok(Handled::Consumed),
            Err(e) => return Err(e),
        };
        let reason = reason.unwrap_or(JsonStr::EMPTY);
        let mut text = String::<MAX_CLOSE_REASON>::new();
        for c in reason.chars() {
            if text.push(c).is_err() {
                break;
            }
        }
        if text.is_empty() {
            let _ = text.push_str("closed");
        }
        if let Some(error) = error.filter(|e| !e.is_empty()) {
            let _ = text.push_str(": ");
            for c in error.chars() {
                if text.push(c).is_err() {
                    break;
                }
            }
        }
        let code = if reason == "service_closed" {
            1000
        } else {
            1011
        };
        if let Some(entry) = self.streams.at(slot) {
            // The adapter logs the outcome (with the tunnel id) when it closes the socket.
            debug!(
                "tunnel {}: closed by the agent ({})",
                entry.id(),
                text.as_str()
            );
        }
        self.agent_closed(slot, Some(Close::new(code, text.as_str())));
        Ok(Handled::Consumed)
    }

    /// The live TCP stream a `tcp_tunnel_*` message names: `Ok(None)` for a late message after
    /// the stream finished (dropped quietly), an error for an unknown one or a non-TCP stream.
    fn tcp_slot(&mut self, env: &Envelope<'_>) -> Result<Option<crate::table::Slot>, TunnelError> {
        let Some(id) = tunnel_id(env) else {
            let error = TunnelError::Decode(DecodeError::MissingField("tunnel_id"));
            return Err(self.reject(None, error, true));
        };
        let Some(slot) = self.lookup(id) else {
            return self.unknown_stream(id).map(|_| None);
        };
        if self
            .streams
            .at(slot)
            .is_some_and(|e| e.value.kind != StreamKind::Tcp)
        {
            return Err(self.reject(Some(id), TunnelError::Unexpected, false));
        }
        Ok(Some(slot))
    }
}

/// The tunnel a `tcp_tunnel_*` message names: `payload.tunnel_id`, else the envelope's request id
/// (the agent's relay sends the latter).
pub(super) fn tunnel_id<'a>(env: &Envelope<'a>) -> Option<JsonStr<'a>> {
    opt_str(env.payload.get("tunnel_id"), "tunnel_id")
        .ok()
        .flatten()
        .or(env.request_id)
}

/// The `tcp_tunnel_close` for a client close: code 1000 is a clean EOF (`client_closed`), anything
/// else a socket error (`client_error`, with the reason as `error`).
pub(super) fn close_message<'a>(id: WireStr<'a>, close: &'a Close) -> ControlMessage<'a> {
    let clean = close.code == 1000;
    ControlMessage::TcpTunnelClose {
        tunnel_id: id,
        reason: WireStr::Plain(if clean {
            "client_closed"
        } else {
            "client_error"
        }),
        error: (!close.reason.is_empty()).then_some(WireStr::Plain(close.reason.as_str())),
    }
}
