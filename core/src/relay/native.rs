//! The relay's native wire mode: binary frames in and out, per-stream credit.
//!
//! Used once both ends advertised the `native` extension at registration. WebSocket streams then
//! travel as [`NativeFrame`]s: the control plane sends `start`, `data`, `close` and `credit`; the
//! agent sends `started`, `error`, `data`, `close` and `credit`. Everything else (registration,
//! heartbeats, pings, HTTP requests, TCP tunnels, `proxy_error` replies to bad input) stays a JSON
//! envelope. Flow control follows [`crate::credit`]: the tunnel reader is never paused.

use crate::engine;
use crate::table::{Slot, StreamState};
use crate::time::Instant;
use crate::wire::native::{self, DataKind, FrameKind, NativeError, NativeFrame};

use super::{
    Close, Handled, PayloadBuf, Relay, StartFields, Transmit, TransmitError, TunnelError, stream_id,
};

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Relay<M, STREAMS, RING> {
    /// The tunnel's bulk window: data bytes sent and not acknowledged, and the limit on them
    /// for bulk messages (extension `native_ack`; without it nothing is bounded).
    #[must_use]
    pub const fn bulk_window(&self) -> (u64, u64) {
        (self.window.in_flight(), self.window.limit())
    }

    /// Whether this session speaks the native wire mode (both ends advertised it).
    #[must_use]
    pub const fn is_native(&self) -> bool {
        self.session.extensions.native
    }

    /// Handles one native frame from the control plane.
    pub(super) fn handle_native<'a>(
        &mut self,
        now: Instant,
        frame: &'a [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let frame = match NativeFrame::decode(frame, self.config.max_message) {
            Ok(frame) => frame,
            Err(e) => return Err(self.reject_native(now, e)),
        };
        match frame {
            NativeFrame::Start { stream, request } => self.on_native_start(now, stream, request),
            NativeFrame::Data {
                stream,
                kind,
                payload,
            } => {
                self.window.on_received(payload.len());
                self.on_native_data(now, stream, kind, payload.len(), || M::from_slice(payload))
            }
            NativeFrame::Ack { received } => match self.window.on_ack(now, received) {
                Ok(()) => Ok(Handled::Consumed),
                Err(e) => Err(self.reject_id(heapless::String::new(), false, TunnelError::Ack(e))),
            },
            NativeFrame::Close {
                stream,
                code,
                reason,
            } => {
                let Some(slot) = self.find_wire(stream) else {
                    return self.unknown_wire(stream);
                };
                if self.streams.at(slot).is_some_and(|e| e.value.is_tcp()) {
                    self.tcp_closed_by_tunnel(now, slot, reason);
                } else {
                    self.close_requested(now, slot, Some(Close::new(code, reason)));
                }
                Ok(Handled::Consumed)
            }
            NativeFrame::Credit {
                stream,
                bytes,
                messages,
            } => {
                let Some(slot) = self.find_wire(stream) else {
                    return self.unknown_wire(stream);
                };
                if let Some(entry) = self.streams.at_mut(slot)
                    && let Some(blocked) = entry.value.pipe.credit.on_grant(now, bytes, messages)
                {
                    self.stats.credit_blocked_micros += blocked.as_micros();
                }
                Ok(Handled::Consumed)
            }
            NativeFrame::Started { stream, .. } | NativeFrame::Error { stream, .. } => {
                let error = TunnelError::UnexpectedFrame(frame.kind());
                Err(self.reject_id(native::stream_name(stream), true, error))
            }
        }
    }

    /// Handles a native data frame held in an owned buffer, sharing its payload instead of
    /// copying it ([`PayloadBuf::sliced`]). Same contract as
    /// [`handle_tunnel_message`](Self::handle_tunnel_message) for that frame (a data frame never
    /// yields [`Handled::Start`] or [`Handled::Other`], and never blocks in native mode).
    ///
    /// Call it only on a native session ([`is_native`](Self::is_native)) for frames that
    /// [`native::is_data`] accepts; anything else is refused with
    /// [`TunnelError::UnexpectedFrame`] and should go to `handle_tunnel_message`.
    ///
    /// # Errors
    /// As [`handle_tunnel_message`](Self::handle_tunnel_message).
    pub fn handle_native_data(&mut self, now: Instant, frame: M) -> Result<(), TunnelError> {
        self.handle_tunnel_activity(now);
        if self.replies.is_full() {
            return Err(self.block(super::Blocker::Replies));
        }
        if !self.is_native() || !native::is_data(frame.as_bytes()) {
            return Err(TunnelError::UnexpectedFrame(FrameKind::Data));
        }
        let (stream, kind, len) =
            match NativeFrame::decode(frame.as_bytes(), self.config.max_message) {
                Ok(NativeFrame::Data {
                    stream,
                    kind,
                    payload,
                }) => (stream, kind, payload.len()),
                Ok(other) => return Err(TunnelError::UnexpectedFrame(other.kind())),
                Err(e) => return Err(self.reject_native(now, e)),
            };
        self.window.on_received(len);
        self.on_native_data(now, stream, kind, len, || frame.sliced(native::HEADER_LEN))
            .map(|_| ())
    }

    /// A data message of `len` bytes for native stream `wire`: checks its credit and queues it
    /// for the upstream, its buffer built by `make`.
    fn on_native_data<'a>(
        &mut self,
        now: Instant,
        wire: u32,
        kind: DataKind,
        len: usize,
        make: impl FnOnce() -> Option<M>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.find_wire(wire) else {
            return self.unknown_wire(wire);
        };
        if let Some(entry) = self.streams.at_mut(slot)
            && entry.state() != StreamState::Closing
            && let Err(e) = entry.value.pipe.credit.on_received(len)
        {
            let id = entry.id().clone();
            if entry.value.is_tcp() {
                self.abort_tunnel(now, slot, "flow control violated");
            } else {
                self.close_from_tunnel(now, slot, Close::new(1008, "flow control violated"));
            }
            return Err(self.reject_stream(&id, TunnelError::Credit(e)));
        }
        let delivering = self
            .streams
            .at(slot)
            .is_some_and(|e| e.state() != StreamState::Closing);
        let handled = self.push_upstream_with(now, slot, kind.into(), len, make)?;
        if delivering && let Some(tcp) = self.streams.at_mut(slot).and_then(|e| e.value.tcp_mut()) {
            tcp.bytes_received += len as u64;
        }
        Ok(handled)
    }

    fn on_native_start<'a>(
        &mut self,
        now: Instant,
        wire: u32,
        request: &'a [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        self.session.highest_wire = self.session.highest_wire.max(wire);
        let start = match native::decode_start_body(request) {
            Ok(start) => start,
            Err(e) => return Err(self.reject_id(native::stream_name(wire), true, e.into())),
        };
        let id = match stream_id(start.stream_id) {
            Ok(id) => id,
            Err(e) => return Err(self.reject(Some(start.stream_id), true, e.into())),
        };
        if self.find_wire(wire).is_some() {
            // Never touch the live stream that has this number.
            return Err(self.reject_stream(&id, TunnelError::DuplicateStream));
        }
        let fields = StartFields {
            path: start.path,
            query: start.query,
            headers: start.headers,
            protocol: start.protocol,
            method: start.method,
            upgrade: start.upgrade,
        };
        let request = self.open_stream(now, id, fields)?;
        if let Some(slot) = self.streams.find(request.stream.as_str())
            && let Some(entry) = self.streams.at_mut(slot)
        {
            entry.value.pipe.go_native(wire, self.config.ring_bytes);
        }
        Ok(Handled::Start(request))
    }

    /// Rejects a malformed native frame; an oversize data or close frame for a live stream closes
    /// that stream with 1009.
    fn reject_native(&mut self, now: Instant, error: NativeError) -> TunnelError {
        let stream = match error {
            NativeError::TooLarge { stream, .. } => stream,
            _ => None,
        };
        if let Some(wire) = stream
            && let Some(slot) = self.find_wire(wire)
        {
            self.close_from_tunnel(now, slot, Close::new(1009, "message too big"));
        }
        let error = match error {
            NativeError::TooLarge { len, max, .. } => TunnelError::TooLarge { len, max },
            e => TunnelError::Native(e),
        };
        let name = stream.map(native::stream_name).unwrap_or_default();
        self.reject_id(name, stream.is_some(), error)
    }

    fn unknown_wire<'a>(&mut self, wire: u32) -> Result<Handled<'a>, TunnelError> {
        // Numbers are never reused on a tunnel: a frame for a number not live is late (the
        // stream finished) when the number was handed out already, an error otherwise.
        let late = wire <= self.session.highest_wire;
        self.unknown(late, native::stream_name(wire))
    }

    /// The live native stream with tunnel number `wire`.
    pub(super) fn find_wire(&self, wire: u32) -> Option<Slot> {
        self.streams
            .iter()
            .find(|(_, e)| e.value.pipe.wire == wire)
            .map(|(slot, _)| slot)
    }

    /// Encodes the next control frame owed by native stream `slot`: credit, then for a TCP
    /// tunnel its close ([`transmit_native_tcp_close`](Self::transmit_native_tcp_close)), for a
    /// WebSocket stream started, error, close.
    pub(super) fn transmit_native_control(
        &mut self,
        slot: Slot,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        let Some(entry) = self.streams.at_mut(slot) else {
            return Ok(None);
        };
        let upstream_open = entry.value.upstream_alive && entry.state() != StreamState::Closing;
        if let Some(n) = entry.value.pipe.take_grant(upstream_open, buf)? {
            return Ok(Some(n));
        }
        if entry.value.is_tcp() {
            return self.transmit_native_tcp_close(slot, buf);
        }
        let d = &entry.value;
        let wire = d.pipe.wire;
        let frame = if d.owe_started {
            NativeFrame::Started {
                stream: wire,
                subprotocol: d.subprotocol(),
            }
        } else if let Some(failure) = &d.owe_failed {
            NativeFrame::Error {
                stream: wire,
                status: Some(failure.status),
                message: failure.message.as_str(),
            }
        } else if let Some(close) = d.owe_close.as_ref().filter(|_| d.pipe.to_tunnel.is_empty()) {
            NativeFrame::Close {
                stream: wire,
                code: close.code,
                reason: close.reason.as_str(),
            }
        } else {
            return Ok(None);
        };
        let kind = frame.kind();
        let n = frame.encode(buf)?;
        if let Some(e) = self.streams.at_mut(slot) {
            let d = &mut e.value;
            match kind {
                FrameKind::Started => d.owe_started = false,
                FrameKind::Error => d.owe_failed = None,
                _ => d.owe_close = None,
            }
        }
        if kind == FrameKind::Close {
            self.settle(slot);
        }
        Ok(Some(n))
    }

    /// Encodes the front data message of native stream `slot` if it holds credit; otherwise
    /// starts its blocked clock and sends nothing.
    pub(super) fn transmit_native_data(
        &mut self,
        slot: Slot,
        now: Instant,
        buf: &mut [u8],
        owned: bool,
    ) -> Result<Option<Transmit<M>>, TransmitError> {
        let sent = engine::transmit_native_data(
            &mut self.streams,
            &mut self.budget,
            &mut self.window,
            slot,
            now,
            buf,
            owned,
            &mut self.stats.credit_stalls,
        )?;
        Ok(sent.map(|sent| {
            if let Some(tcp) = self.streams.at_mut(slot).and_then(|e| e.value.tcp_mut()) {
                tcp.bytes_sent += sent.len as u64;
            }
            sent.transmit
        }))
    }

    /// Whether the front message toward the tunnel of `slot` is small enough to go ahead of bulk
    /// data (and may be sent now).
    pub(super) fn is_interactive(&self, slot: Slot) -> bool {
        self.streams
            .at(slot)
            .is_some_and(|e| e.value.pipe.front_is_interactive())
    }
}
