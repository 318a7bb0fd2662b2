//! The gateway's native wire mode: binary frames in and out, per-stream credit.
//!
//! Used once both ends advertised the `native` extension at registration. WebSocket streams then
//! travel as [`NativeFrame`]s: the gateway sends `start`, `data`, `close` and `credit`; the agent
//! sends `started`, `error`, `data`, `close` and `credit`. Registration, heartbeats, HTTP
//! requests, TCP tunnels and error replies stay JSON envelopes. Flow control follows
//! [`crate::credit`]: the tunnel reader is never paused for a native stream.

use crate::engine;
use crate::relay::{Close, PayloadBuf, Transmit};
use crate::table::{Slot, StreamState};
use crate::text::truncated;
use crate::time::Instant;
use crate::wire::ControlMessage;
use crate::wire::native::{self, DataKind, FrameKind, NativeError, NativeFrame, StartRequest};

use super::{Gateway, Handled, OpenError, TransmitError, TunnelError};

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Gateway<M, STREAMS, RING> {
    /// The tunnel's bulk window: data bytes sent and not acknowledged, and the limit on them
    /// for bulk messages (extension `native_ack`; without it nothing is bounded).
    #[must_use]
    pub const fn bulk_window(&self) -> (u64, u64) {
        (self.window.in_flight(), self.window.limit())
    }

    /// Whether this tunnel speaks the native wire mode (both ends advertised it).
    #[must_use]
    pub const fn is_native(&self) -> bool {
        self.session.extensions.native
    }

    /// Encodes a native start frame for `message` under the next stream number.
    pub(super) fn encode_native_start(
        &self,
        message: &ControlMessage<'_>,
        scratch: &mut [u8],
    ) -> Result<(M, u32), OpenError> {
        let wire = self
            .session
            .last_wire
            .checked_add(1)
            .ok_or(OpenError::TooManyStreams)?;
        let Some(start) = StartRequest::from_control(message) else {
            return Err(OpenError::TooLarge { needed: 0 });
        };
        let n = match native::encode_start(scratch, wire, &start) {
            Ok(n) => n,
            Err(crate::wire::EncodeError::BufferTooSmall { needed }) => {
                return Err(OpenError::TooLarge { needed });
            }
            Err(e) => return Err(OpenError::Encode(e)),
        };
        if n > self.max_transmit_len() {
            return Err(OpenError::TooLarge { needed: n });
        }
        let start = M::from_slice(&scratch[..n]).ok_or(OpenError::PayloadRefused { len: n })?;
        Ok((start, wire))
    }

    /// Handles one native frame from the agent.
    pub(super) fn handle_native<'a>(
        &mut self,
        now: Instant,
        frame: &'a [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let frame = match NativeFrame::decode(frame, self.config.max_message) {
            Ok(frame) => frame,
            Err(e) => return Err(self.reject_native(e)),
        };
        if let NativeFrame::Ack { received } = frame {
            return match self.window.on_ack(now, received) {
                Ok(()) => Ok(Handled::Consumed),
                Err(e) => {
                    Err(self.reject_named(heapless::String::new(), TunnelError::Ack(e), true))
                }
            };
        }
        if let NativeFrame::Data { payload, .. } = frame {
            self.window.on_received(payload.len());
        }
        let stream = frame.stream();
        let Some(slot) = self.find_wire(stream) else {
            if matches!(frame, NativeFrame::Start { .. }) {
                return Err(self.unexpected(stream, FrameKind::Start));
            }
            return self.unknown_wire(stream);
        };
        match frame {
            NativeFrame::Started { subprotocol, .. } => {
                self.started_at(slot, truncated(subprotocol.chars()))
            }
            NativeFrame::Error {
                status, message, ..
            } => {
                self.agent_error_at(slot, truncated(message.chars()), status);
                Ok(Handled::Consumed)
            }
            NativeFrame::Data { kind, payload, .. } => {
                self.on_native_data(slot, kind, payload.len(), || M::from_slice(payload))
            }
            NativeFrame::Close { code, reason, .. } => {
                self.agent_closed(slot, Some(Close::new(code, reason)));
                Ok(Handled::Consumed)
            }
            NativeFrame::Credit {
                bytes, messages, ..
            } => {
                if let Some(entry) = self.streams.at_mut(slot)
                    && let Some(blocked) = entry.value.pipe.credit.on_grant(now, bytes, messages)
                {
                    self.stats.credit_blocked_micros += blocked.as_micros();
                }
                Ok(Handled::Consumed)
            }
            NativeFrame::Start { .. } => Err(self.unexpected(stream, FrameKind::Start)),
            // Taken before the stream lookup (an ack names no stream).
            NativeFrame::Ack { .. } => Ok(Handled::Consumed),
        }
    }

    /// Handles a native data frame held in an owned buffer, sharing its payload instead of
    /// copying it ([`PayloadBuf::sliced`]). Same contract as
    /// [`handle_tunnel_message`](Self::handle_tunnel_message) for that frame (a data frame never
    /// yields [`Handled::ResponseHead`] or [`Handled::Other`], and never blocks in native mode).
    ///
    /// Call it only on a native tunnel ([`is_native`](Self::is_native)) for frames that
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
                Err(e) => return Err(self.reject_native(e)),
            };
        self.window.on_received(len);
        let Some(slot) = self.find_wire(stream) else {
            return self.unknown_wire(stream).map(|_| ());
        };
        self.on_native_data(slot, kind, len, || frame.sliced(native::HEADER_LEN))
            .map(|_| ())
    }

    /// A data message of `len` bytes for native stream `slot`: checks its credit and queues it
    /// for the client, its buffer built by `make`.
    fn on_native_data<'a>(
        &mut self,
        slot: Slot,
        kind: DataKind,
        len: usize,
        make: impl FnOnce() -> Option<M>,
    ) -> Result<Handled<'a>, TunnelError> {
        if let Some(entry) = self.streams.at_mut(slot)
            && entry.value.agent_alive
            && let Err(e) = entry.value.pipe.credit.on_received(len)
        {
            let name = truncated(entry.id().as_str().chars());
            self.close_both(slot, Close::new(1008, "flow control violated"));
            return Err(self.reject_named(name, TunnelError::Credit(e), true));
        }
        self.push_client_with(slot, kind.into(), len, make)
    }

    fn unexpected(&mut self, wire: u32, kind: FrameKind) -> TunnelError {
        self.reject_named(
            native::stream_name(wire),
            TunnelError::UnexpectedFrame(kind),
            true,
        )
    }

    /// Rejects a malformed native frame; an oversize frame for a live stream ends that stream with
    /// 1009.
    fn reject_native(&mut self, error: NativeError) -> TunnelError {
        let stream = match error {
            NativeError::TooLarge { stream, .. } => stream,
            _ => None,
        };
        if let Some(slot) = stream.and_then(|wire| self.find_wire(wire)) {
            self.close_both(slot, Close::new(1009, "message too big"));
        }
        let error = match error {
            NativeError::TooLarge { len, max, .. } => TunnelError::TooLarge { len, max },
            e => TunnelError::Native(e),
        };
        self.reject_named(
            stream.map(native::stream_name).unwrap_or_default(),
            error,
            true,
        )
    }

    /// A frame for a stream number not live: late when the number was handed out (the stream
    /// finished; numbers are never reused), an error otherwise.
    fn unknown_wire<'a>(&mut self, wire: u32) -> Result<Handled<'a>, TunnelError> {
        if wire != 0 && wire <= self.session.last_wire {
            self.stats.late_messages += 1;
            debug!("stream #{}: late message after close dropped", wire);
            return Ok(Handled::Consumed);
        }
        Err(self.reject_named(native::stream_name(wire), TunnelError::UnknownStream, false))
    }

    /// The live native stream with tunnel number `wire`.
    pub(super) fn find_wire(&self, wire: u32) -> Option<Slot> {
        self.streams
            .iter()
            .find(|(_, e)| e.value.pipe.wire == wire)
            .map(|(slot, _)| slot)
    }

    /// Encodes the next control frame owed by native stream `slot` after its start: credit, then
    /// the close once its data is sent.
    pub(super) fn transmit_native_control(
        &mut self,
        slot: Slot,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        let Some(entry) = self.streams.at_mut(slot) else {
            return Ok(None);
        };
        let closing = entry.state() == StreamState::Closing;
        let d = &mut entry.value;
        let wire = d.pipe.wire;
        let receiving = d.client_alive && d.agent_alive && !closing;
        if let Some(n) = d.pipe.take_grant(receiving, buf)? {
            return Ok(Some(n));
        }
        if let Some(close) = d
            .owe_agent_close
            .as_ref()
            .filter(|_| d.pipe.to_tunnel.is_empty())
        {
            let frame = NativeFrame::Close {
                stream: wire,
                code: close.code,
                reason: close.reason.as_str(),
            };
            let n = frame.encode(buf)?;
            d.owe_agent_close = None;
            d.agent_alive = false;
            self.settle(slot);
            return Ok(Some(n));
        }
        Ok(None)
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
            self.stats.bytes_to_agent += sent.len as u64;
            sent.transmit
        }))
    }

    /// Whether the front message toward the agent of `slot` is small enough to go ahead of bulk
    /// data (and may be sent now).
    pub(super) fn is_interactive(&self, slot: Slot) -> bool {
        self.streams
            .at(slot)
            .is_some_and(|e| e.value.start.is_none() && e.value.pipe.front_is_interactive())
    }
}
