//! Raw TCP tunnels: the compat catalogue's `tcp_tunnel_start` / `tcp_tunnel_data` /
//! `tcp_tunnel_close` (§7), carried by the same stream table, rings and events as WebSocket
//! streams.
//!
//! # Sequence
//!
//! [`handle_tunnel_message`](Relay::handle_tunnel_message) returns a `tcp_tunnel_start` as
//! [`Handled::Other`](super::Handled::Other) (an agent without TCP support simply ignores it). An
//! adapter that carries TCP hands it straight to [`start_tcp_tunnel`](Relay::start_tcp_tunnel)
//! (before the next tunnel message): the tunnel id (`payload.tunnel_id`, else the envelope's
//! `request_id`) and the dial target are validated, the tunnel is registered `Opening` and a
//! [`TcpTunnelRequest`] comes back. The adapter dials it and reports exactly like a WebSocket
//! upstream: [`handle_upstream_started`](Relay::handle_upstream_started) (no acknowledgement goes
//! out: the catalogue has none) or [`handle_upstream_failed`](Relay::handle_upstream_failed)
//! (`tcp_tunnel_close {reason: "connection_failed", error}`). A dial that outlives
//! [`Config::dial_timeout`](super::Config::dial_timeout) fails the same way.
//!
//! Bytes flow as [`MessageKind::Binary`] messages through the stream's two rings, in order: the
//! control plane's `tcp_tunnel_data` is split into pieces of at most
//! [`PayloadBuf::max_len`] bytes, admitted whole or not at all (a tunnel message that does not fit
//! is refused with [`TunnelError::Blocked`] and handed in again, as for WebSocket data; one that
//! can never fit the ring is refused and the tunnel closed); the adapter's reads go in with
//! [`handle_upstream_message`](Relay::handle_upstream_message) and leave as `tcp_tunnel_data`, one
//! per message. Events are the WebSocket ones: [`Event::DataForUpstream`](super::Event),
//! `CloseUpstream` (close the socket), `Stop`/`ResumeReadingUpstream`.
//!
//! # Closing
//!
//! * The service closes (EOF): [`handle_tcp_closed`](Relay::handle_tcp_closed) with
//!   [`TcpCloseReason::ServiceClosed`] (or `handle_upstream_closed` with code 1000). Queued bytes
//!   are sent first, then `tcp_tunnel_close {reason: "service_closed", bytes_sent, bytes_received,
//!   duration_ms}`.
//! * A read or write on the socket fails: [`TcpCloseReason::ReadError`] /
//!   [`TcpCloseReason::WriteError`] with the error text (`reason: "read_error"` / `"write_error"`).
//! * The control plane sends `tcp_tunnel_close`: every byte it sent before is still written, then
//!   `CloseUpstream`; nothing more is sent for the tunnel (the control plane is done with it), and
//!   bytes still queued toward it are discarded.
//! * Bad input for a live tunnel (undecodable base64, an oversize message) closes it with
//!   `tcp_tunnel_close {reason: "protocol_error", error}` besides the `proxy_error`: a byte stream
//!   with a hole in it must not go on.
//!
//! `tcp_tunnel_data` for an unknown tunnel is answered with `tcp_tunnel_close {reason:
//! "tunnel_not_found"}` so the control plane drops its end; a message for a recently finished
//! tunnel is dropped quietly (a normal race). Tunnel ids share the stream id space: a WebSocket
//! message naming a tunnel (or the reverse) is an unknown stream.

use heapless::String;

use crate::stream_id::StreamId;
use crate::table::{InsertError, Slot, StreamState};
use crate::time::Instant;
use crate::wire::native::NativeFrame;
use crate::wire::{
    Base64Str, DecodeError, Envelope, FrameError, JsonStr, Outbound, TcpTunnelClose,
    TcpTunnelStart, UnixTime, WireStr,
};

use super::event::truncated;
use super::stream::{Kind, StreamData};
use super::{
    Blocker, Close, Handled, Message, MessageKind, PayloadBuf, Relay, Reply, TransmitError,
    TunnelError, UpstreamError, stream_id,
};

/// Longest host name a tunnel may dial (DNS limit).
pub const MAX_TCP_HOST: usize = 253;

/// Host dialled when a start names no service (the PipeOps agent dials `localhost:gateway_port`).
const DEFAULT_HOST: &str = "localhost";

/// A validated `tcp_tunnel_start`, registered `Opening`: dial `host:port`, then report with
/// [`Relay::handle_upstream_started`] or [`Relay::handle_upstream_failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpTunnelRequest<'a> {
    /// The tunnel (its stream id).
    pub tunnel: StreamId,
    /// Host to dial: `service_name`, else `localhost`. Only letters, digits and `.-_:[]`.
    pub host: String<MAX_TCP_HOST>,
    /// Port to dial: `service_port`, else `gateway_port`.
    pub port: u16,
    /// `service_namespace`, for adapters that qualify `host` (a cluster agent dials
    /// `<host>.<namespace>.svc`); a gateway ignores it.
    pub namespace: Option<JsonStr<'a>>,
    /// `client_addr`: who connected on the control plane's side, for logs.
    pub client_addr: Option<JsonStr<'a>>,
    /// The whole start, for anything else an adapter wants (gateway name, ...).
    pub start: TcpTunnelStart<'a>,
}

/// Why a tunnel's socket is gone, as reported to the control plane in `tcp_tunnel_close.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TcpCloseReason {
    /// The service closed the connection (EOF): `service_closed`.
    ServiceClosed,
    /// Reading the socket failed: `read_error`.
    ReadError,
    /// Writing the socket failed: `write_error`.
    WriteError,
}

impl TcpCloseReason {
    /// The wire text.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ServiceClosed => "service_closed",
            Self::ReadError => "read_error",
            Self::WriteError => "write_error",
        }
    }
}

/// The `reason` of the close owed for a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    ConnectionFailed,
    ProtocolError,
    Closed(TcpCloseReason),
}

impl Reason {
    const fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionFailed => "connection_failed",
            Self::ProtocolError => "protocol_error",
            Self::Closed(r) => r.as_str(),
        }
    }
}

/// Per-tunnel bookkeeping kept in [`StreamData`].
#[derive(Clone, Debug)]
pub(crate) struct TcpData {
    /// When the start arrived (for `duration_ms`).
    pub(crate) opened: Instant,
    /// Bytes sent to the control plane (`bytes_sent`).
    pub(crate) bytes_sent: u64,
    /// Bytes received from the control plane (`bytes_received`).
    pub(crate) bytes_received: u64,
    /// `reason` of the close owed to the control plane; its `error` is the owed close's reason
    /// text (kept there to keep the stream slot small).
    pub(crate) reason: Reason,
}

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Relay<M, STREAMS, RING> {
    /// Registers the tunnel of a `tcp_tunnel_start` that
    /// [`handle_tunnel_message`](Self::handle_tunnel_message) returned as
    /// [`Handled::Other`]; call before handing in the next tunnel message. See the
    /// [relay docs](super#raw-tcp-tunnels).
    ///
    /// # Errors
    /// The start is refused and answered: an invalid or missing tunnel id, or a duplicate of a live
    /// stream (which is left untouched), with `proxy_error`; a full table or an unusable target
    /// (no port, a bad host) with `tcp_tunnel_close {reason: "connection_failed", error}`.
    pub fn start_tcp_tunnel<'a>(
        &mut self,
        now: Instant,
        env: &Envelope<'a>,
        start: &TcpTunnelStart<'a>,
    ) -> Result<TcpTunnelRequest<'a>, TunnelError> {
        let Some(raw_id) = start.tunnel_id.or(env.request_id) else {
            let error = TunnelError::Decode(DecodeError::MissingField("tunnel_id"));
            return Err(self.reject(None, false, error));
        };
        let id = match stream_id(raw_id) {
            Ok(id) => id,
            Err(e) => return Err(self.reject(Some(raw_id), false, e.into())),
        };
        let target = tcp_target(start);
        let (host, port) = match target {
            Ok(target) => target,
            Err(error) => return Err(self.refuse_tunnel(&id, error)),
        };
        let ext = self.session.extensions;
        let wire = start.stream.filter(|_| ext.native && ext.native_tcp);
        if let Some(wire) = wire {
            if wire == 0 || self.find_wire(wire).is_some() {
                // Never touch the live stream that has this number.
                return Err(self.reject_stream(&id, TunnelError::DuplicateStream));
            }
            self.session.highest_wire = self.session.highest_wire.max(wire);
        }
        let mut data = StreamData::new(self.config.ring_bytes, now + self.config.dial_timeout);
        if let Some(wire) = wire {
            data.pipe.go_native(wire, self.config.ring_bytes);
        }
        data.kind = Kind::Tcp(TcpData {
            opened: now,
            bytes_sent: 0,
            bytes_received: 0,
            reason: Reason::ConnectionFailed,
        });
        match self.streams.insert(id.clone(), data) {
            Ok(_) => {}
            Err(InsertError::Duplicate) => {
                return Err(self.reject_stream(&id, TunnelError::DuplicateStream));
            }
            Err(InsertError::Full) => {
                return Err(self.refuse_tunnel(&id, TunnelError::TooManyStreams));
            }
        }
        self.stats.streams_opened += 1;
        self.recently_closed.forget(&id);
        info!("tunnel {}: start tcp {}:{}", id, host.as_str(), port);
        Ok(TcpTunnelRequest {
            tunnel: id,
            host,
            port,
            namespace: start.service_namespace,
            client_addr: start.client_addr,
            start: *start,
        })
    }

    /// The tunnel's socket is gone for `reason` (`error` says why; empty for
    /// [`TcpCloseReason::ServiceClosed`]). Bytes already queued toward the control plane are sent
    /// first, then `tcp_tunnel_close` (unless the control plane closed the tunnel itself).
    ///
    /// # Errors
    /// [`UpstreamError::UnknownStream`] (also for a WebSocket stream id).
    pub fn handle_tcp_closed(
        &mut self,
        now: Instant,
        tunnel: &str,
        reason: TcpCloseReason,
        error: &str,
    ) -> Result<(), UpstreamError> {
        let _ = now;
        let slot = self
            .streams
            .find(tunnel)
            .ok_or(UpstreamError::UnknownStream)?;
        let entry = self
            .streams
            .at_mut(slot)
            .ok_or(UpstreamError::UnknownStream)?;
        let reported = entry.value.tunnel_closed;
        let Some(tcp) = entry.value.tcp_mut() else {
            return Err(UpstreamError::UnknownStream);
        };
        if !reported {
            tcp.reason = Reason::Closed(reason);
        }
        info!("tunnel {}: socket closed ({})", tunnel, reason.as_str());
        self.upstream_gone(slot, None, Close::new(1000, error));
        Ok(())
    }

    /// Whether `stream` is a live TCP tunnel (rather than a WebSocket stream).
    #[must_use]
    pub fn is_tcp_tunnel(&self, stream: &str) -> bool {
        self.streams.get(stream).is_some_and(|e| e.value.is_tcp())
    }

    // ---------------------------------------------------------------------------------------------
    // Tunnel input (called from handle_tunnel_message)

    /// `tcp_tunnel_data`.
    pub(super) fn on_tcp_data<'a>(
        &mut self,
        now: Instant,
        env: &Envelope<'_>,
        tunnel_id: Option<JsonStr<'_>>,
        data: Base64Str<'_>,
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(raw_id) = tunnel_id.or(env.request_id) else {
            let error = TunnelError::Decode(DecodeError::MissingField("tunnel_id"));
            return Err(self.reject(None, false, error));
        };
        let Some(slot) = self.lookup_tcp(raw_id) else {
            return self.unknown_tunnel(raw_id);
        };
        let bytes = match data.decode_into(scratch) {
            Ok(bytes) => bytes,
            Err(FrameError::BufferTooSmall { needed }) => {
                return Err(TunnelError::ScratchTooSmall { needed });
            }
            Err(e) => {
                self.abort_tunnel(now, slot, "invalid tcp_tunnel_data");
                return Err(self.reject(Some(raw_id), true, e.into()));
            }
        };
        let len = bytes.len();
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        if len == 0 {
            return Ok(Handled::Consumed);
        }
        if entry.state() == StreamState::Closing {
            self.stats.discarded_messages += 1;
            debug!("tunnel {}: data after close discarded", entry.id());
            return Ok(Handled::Consumed);
        }
        let piece = M::max_len().max(1);
        let pieces = len.div_ceil(piece);
        let ring = &entry.value.pipe.to_local;
        let budget = ring.byte_budget();
        if pieces > ring.capacity() || (pieces > 1 && len > budget) {
            // Can never be admitted: refusing it would wedge the tunnel reader for good.
            let max = ring.capacity().saturating_mul(piece).min(budget.max(piece));
            let id = entry.id().clone();
            self.abort_tunnel(now, slot, "tcp_tunnel_data larger than this agent accepts");
            return Err(self.reject_stream(&id, TunnelError::TooLarge { len, max }));
        }
        let fits = ring.len() + pieces <= ring.capacity()
            && (ring.bytes() + len <= budget || (ring.is_empty() && pieces == 1));
        if !fits {
            let blocker = Blocker::Pieces {
                id: entry.id().clone(),
                bytes: len,
                pieces,
            };
            return Err(self.block(blocker));
        }
        let was_empty = ring.is_empty();
        let mut chunks = bytes.chunks(piece);
        // The first piece is the largest: if the buffer type takes it, it takes them all.
        let Some(first) = chunks.next().and_then(M::from_slice) else {
            let id = entry.id().clone();
            self.abort_tunnel(now, slot, "tcp_tunnel_data refused by the buffer type");
            return Err(self.reject_stream(&id, TunnelError::PayloadRefused { len }));
        };
        let d = &mut entry.value;
        let pieces = core::iter::once(Some(first)).chain(chunks.map(M::from_slice));
        for payload in pieces {
            let pushed = payload.is_some_and(|payload| {
                let message = Message {
                    kind: MessageKind::Binary,
                    payload,
                };
                d.pipe.to_local.push(message).is_ok()
            });
            if !pushed {
                // Unreachable: admission of every piece was checked above.
                warn!("tunnel ring refused a checked piece");
                break;
            }
        }
        if let Some(tcp) = d.tcp_mut() {
            tcp.bytes_received += len as u64;
        }
        if was_empty && entry.state() == StreamState::Open {
            entry.value.pipe.owe_readable = true;
        }
        Ok(Handled::Consumed)
    }

    /// `tcp_tunnel_close` from the control plane.
    pub(super) fn on_tcp_close<'a>(
        &mut self,
        now: Instant,
        env: &Envelope<'_>,
        tunnel_id: Option<JsonStr<'_>>,
        reason: Option<JsonStr<'_>>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(raw_id) = tunnel_id.or(env.request_id) else {
            let error = TunnelError::Decode(DecodeError::MissingField("tunnel_id"));
            return Err(self.reject(None, false, error));
        };
        let Some(slot) = self.lookup_tcp(raw_id) else {
            if self.recently_closed.contains(&raw_id) {
                self.stats.late_messages += 1;
                return Ok(Handled::Consumed);
            }
            // Never answer a close with a close: report it.
            return Err(self.reject(Some(raw_id), true, TunnelError::UnknownStream));
        };
        let reason: String<64> = reason.map(|r| truncated(r.chars())).unwrap_or_default();
        self.tcp_closed_by_tunnel(now, slot, reason.as_str());
        Ok(Handled::Consumed)
    }

    /// The control plane closed the tunnel at `slot` (`tcp_tunnel_close`, or a native close
    /// frame): the socket gets every byte sent before, then is closed; nothing more is sent.
    pub(super) fn tcp_closed_by_tunnel(&mut self, now: Instant, slot: Slot, reason: &str) {
        self.close_from_tunnel(now, slot, Close::new(1000, reason));
        self.tunnel_done(slot);
    }

    /// The control plane is done with the tunnel at `slot`: nothing more goes to it.
    fn tunnel_done(&mut self, slot: Slot) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        let d = &mut entry.value;
        d.tunnel_closed = true;
        d.owe_failed = None;
        d.owe_close = None;
        let discarded = d.pipe.to_tunnel.clear().0;
        self.stats.discarded_messages += discarded as u64;
        if d.pipe.reading_stopped {
            d.pipe.reading_stopped = false;
            d.pipe.flow = None;
        }
        self.settle(slot);
    }

    /// Closes a live tunnel because of bad input: the socket gets what was queued before, then is
    /// closed; the control plane gets `tcp_tunnel_close {reason: "protocol_error", error}`.
    pub(super) fn abort_tunnel(&mut self, now: Instant, slot: Slot, error: &str) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        if entry.state() == StreamState::Closing {
            return;
        }
        warn!("tunnel {}: closed: {}", entry.id(), error);
        let d = &mut entry.value;
        let discarded = d.pipe.to_tunnel.clear().0;
        self.stats.discarded_messages += discarded as u64;
        if let Some(tcp) = d.tcp_mut() {
            tcp.reason = Reason::ProtocolError;
        }
        d.tunnel_closed = true;
        d.owe_close = Some(Close::new(1002, error));
        d.pipe.reading_stopped = false;
        d.pipe.flow = None;
        self.close_from_tunnel(now, slot, Close::new(1002, "protocol error"));
    }

    /// A tunnel message for a tunnel that is not live.
    fn unknown_tunnel<'a>(&mut self, id: JsonStr<'_>) -> Result<Handled<'a>, TunnelError> {
        if self.recently_closed.contains(&id) {
            self.stats.late_messages += 1;
            debug!("tunnel {}: late message after close dropped", id);
            return Ok(Handled::Consumed);
        }
        warn!("tunnel {}: rejected: unknown tunnel id", id);
        self.stats.bad_messages += 1;
        self.push_reply(Reply::TcpClose {
            tunnel_id: truncated(id.chars()),
            reason: "tunnel_not_found",
            error: "unknown tunnel id",
        });
        Err(TunnelError::UnknownStream)
    }

    /// Refuses a start whose id is free with `tcp_tunnel_close {reason: "connection_failed"}`.
    fn refuse_tunnel(&mut self, id: &StreamId, error: TunnelError) -> TunnelError {
        warn!("tunnel {}: refused: {}", id, error);
        self.stats.bad_messages += 1;
        let text = match error {
            TunnelError::TooManyStreams => "too many streams",
            TunnelError::Decode(DecodeError::MissingField(_)) => "no port to dial",
            _ => "invalid host to dial",
        };
        self.push_reply(Reply::TcpClose {
            tunnel_id: truncated(id.as_str().chars()),
            reason: "connection_failed",
            error: text,
        });
        error
    }

    /// The live TCP tunnel named by a JSON string.
    pub(super) fn lookup_tcp(&self, id: JsonStr<'_>) -> Option<Slot> {
        self.lookup(id)
            .filter(|slot| self.streams.at(*slot).is_some_and(|e| e.value.is_tcp()))
    }

    // ---------------------------------------------------------------------------------------------
    // Outputs (called from poll_transmit)

    /// The control message owed for tunnel `slot`, if any: the failed dial or the close.
    pub(super) fn transmit_tcp_control(
        &mut self,
        slot: Slot,
        now: Instant,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        let Some(entry) = self.streams.at(slot) else {
            return Ok(None);
        };
        let d = &entry.value;
        let Kind::Tcp(tcp) = &d.kind else {
            return Ok(None);
        };
        let id = WireStr::Plain(entry.id().as_str());
        let duration_ms = Some(now.saturating_duration_since(tcp.opened).as_millis());
        let close = if let Some(failure) = &d.owe_failed {
            TcpTunnelClose {
                reason: "connection_failed",
                bytes_sent: None,
                bytes_received: None,
                duration_ms,
                error: Some(failure.message.as_str()),
            }
        } else if let Some(close) = d.owe_close.as_ref().filter(|_| d.pipe.to_tunnel.is_empty()) {
            TcpTunnelClose {
                reason: tcp.reason.as_str(),
                bytes_sent: Some(tcp.bytes_sent),
                bytes_received: Some(tcp.bytes_received),
                duration_ms,
                error: (!close.reason.is_empty()).then_some(close.reason.as_str()),
            }
        } else {
            return Ok(None);
        };
        let n = Outbound::TcpTunnelClose(close).encode(Some(id), unix, buf)?;
        if let Some(e) = self.streams.at_mut(slot) {
            e.value.owe_failed = None;
            e.value.owe_close = None;
        }
        self.settle(slot);
        Ok(Some(n))
    }
}

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Relay<M, STREAMS, RING> {
    /// The native close owed for tunnel `slot` on a `native_tcp` session, if any (after its
    /// credit, see `transmit_native_control`). A failed dial and every close are one native
    /// `close` frame: code 1000 for `service_closed`, 1002 for `protocol_error`, 1011 otherwise,
    /// the reason being the compat `reason`, then `: error` when there is one (what the control
    /// plane makes of a compat `tcp_tunnel_close`).
    pub(super) fn transmit_native_tcp_close(
        &mut self,
        slot: Slot,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        let Some(entry) = self.streams.at(slot) else {
            return Ok(None);
        };
        let d = &entry.value;
        let Kind::Tcp(tcp) = &d.kind else {
            return Ok(None);
        };
        let (reason, error) = if let Some(failure) = &d.owe_failed {
            (Reason::ConnectionFailed, failure.message.as_str())
        } else if let Some(close) = d.owe_close.as_ref().filter(|_| d.pipe.to_tunnel.is_empty()) {
            (tcp.reason, close.reason.as_str())
        } else {
            return Ok(None);
        };
        let code = match reason {
            Reason::Closed(TcpCloseReason::ServiceClosed) => 1000,
            Reason::ProtocolError => 1002,
            _ => 1011,
        };
        let mut text = String::<{ crate::wire::native::MAX_CLOSE_REASON }>::new();
        let _ = text.push_str(reason.as_str());
        if !error.is_empty() {
            let _ = text.push_str(": ");
            for c in error.chars() {
                if text.push(c).is_err() {
                    break;
                }
            }
        }
        let n = NativeFrame::Close {
            stream: d.pipe.wire,
            code,
            reason: text.as_str(),
        }
        .encode(buf)?;
        if let Some(e) = self.streams.at_mut(slot) {
            e.value.owe_failed = None;
            e.value.owe_close = None;
        }
        self.settle(slot);
        Ok(Some(n))
    }
}

/// Host and port a start asks for.
fn tcp_target(start: &TcpTunnelStart<'_>) -> Result<(String<MAX_TCP_HOST>, u16), TunnelError> {
    let port = start
        .service_port
        .or(start.gateway_port)
        .filter(|p| *p != 0)
        .ok_or(TunnelError::Decode(DecodeError::MissingField(
            "service_port",
        )))?;
    let bad_host = TunnelError::Decode(DecodeError::InvalidValue("service_name"));
    let mut host = String::new();
    match start.service_name.filter(|s| !s.is_empty()) {
        Some(name) => {
            for c in name.chars() {
                let ok =
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']');
                if !ok || host.push(c).is_err() {
                    return Err(bad_host);
                }
            }
        }
        None => {
            let _ = host.push_str(DEFAULT_HOST);
        }
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests;
