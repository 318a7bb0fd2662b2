//! One stream's data path, the same on both ends of the tunnel: a ring each way, credit, and the
//! stop/resume-reading state of its local end.

use crate::budget::Budget;
use crate::credit::{Credit, INTERACTIVE_MAX};
use crate::flow::Flow;
use crate::relay::{Message, PayloadBuf, SendError};
use crate::ring::{Payload, Ring};
use crate::wire::BufferTooSmall;
use crate::wire::native::NativeFrame;

/// Why [`Pipe::push_from_tunnel`] did not queue a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushRefused {
    /// The ring toward the local end cannot take it now (compat streams only: credit bounds a
    /// credited ring). The tunnel reader must pause until it can.
    Full,
    /// The payload buffer could not be built (too large for `M`): the stream must close.
    Payload,
}

/// A stream's data path in both directions. The role that owns the stream (agent or control
/// plane) decides *whether* a stream may carry data (its lifecycle); the pipe decides *how much*
/// and keeps the two directions' bookkeeping identical on both ends.
///
/// * Local end to tunnel ([`queue_toward_tunnel`](Self::queue_toward_tunnel)): bounded by the
///   ring and the shared [`Budget`]; a refusal hands the message back and tells the adapter to
///   stop reading the local end (once), [`crate::engine::sent_front`] tells it to resume.
/// * Tunnel to local end ([`push_from_tunnel`](Self::push_from_tunnel)): bounded by credit
///   when the stream is credited (the peer never sends more than the ring takes), otherwise by
///   the ring, which makes the tunnel reader pause.
#[derive(Debug)]
pub(crate) struct Pipe<M, const RING: usize> {
    /// Local end -> tunnel, drained by `poll_transmit`.
    pub(crate) to_tunnel: Ring<Message<M>, RING>,
    /// Tunnel -> local end, popped by the adapter.
    pub(crate) to_local: Ring<Message<M>, RING>,
    /// The stream's number on the tunnel in native mode; 0 for a compat stream.
    pub(crate) wire: u32,
    /// Credit windows, both directions (credited streams only).
    pub(crate) credit: Credit,
    /// Whether the peer sends toward the local end only within `credit`.
    pub(crate) credited: bool,
    /// A "data for the local end" event is owed.
    pub(crate) owe_readable: bool,
    /// The adapter was told to stop reading the local end.
    pub(crate) reading_stopped: bool,
    /// Reading the local end was stopped by the shared budget ([`crate::budget`]).
    pub(crate) budget_stopped: bool,
    /// A pending stop/resume-reading notice for the adapter.
    pub(crate) flow: Option<Flow>,
}

impl<M: Payload, const RING: usize> Pipe<M, RING> {
    /// Empty rings of `ring_bytes` each, compat, reading.
    pub(crate) const fn new(ring_bytes: usize) -> Self {
        Self {
            to_tunnel: Ring::new(ring_bytes),
            to_local: Ring::new(ring_bytes),
            wire: 0,
            credit: Credit::ZERO,
            credited: false,
            owe_readable: false,
            reading_stopped: false,
            budget_stopped: false,
            flow: None,
        }
    }

    /// Makes the stream native under tunnel number `wire` (not 0), with full windows.
    pub(crate) fn go_native(&mut self, wire: u32, ring_bytes: usize) {
        self.wire = wire;
        self.give_credit(ring_bytes);
    }

    /// Bounds the tunnel-to-local direction by credit (full windows) without a native number:
    /// an HTTP response under the `response_credit` extension.
    pub(crate) fn give_credit(&mut self, ring_bytes: usize) {
        self.credit = Credit::new(RING, ring_bytes);
        self.credited = true;
    }

    /// Whether the stream speaks the native wire mode.
    pub(crate) const fn is_native(&self) -> bool {
        self.wire != 0
    }

    /// Tells the adapter to stop reading the local end, unless it was told already. Returns
    /// whether this call told it.
    pub(crate) fn stop_reading(&mut self) -> bool {
        if self.reading_stopped {
            return false;
        }
        self.reading_stopped = true;
        self.flow = Some(Flow::Stop);
        true
    }

    /// Forgets the local end's read state and owed notices (the local end is gone).
    pub(crate) fn forget_local(&mut self) {
        self.owe_readable = false;
        self.reading_stopped = false;
        self.flow = None;
    }

    /// The pending stop/resume notice, if any.
    pub(crate) fn take_flow(&mut self) -> Option<Flow> {
        self.flow.take()
    }

    /// Whether the front message toward the tunnel is small enough to go ahead of bulk data
    /// ([`INTERACTIVE_MAX`]) and may be sent now.
    pub(crate) fn front_is_interactive(&self) -> bool {
        self.to_tunnel
            .front()
            .is_some_and(|m| m.payload.len() <= INTERACTIVE_MAX)
            && (!self.is_native() || self.credit.can_send())
    }

    /// Encodes the credit frame owed to the peer, if one is due and `receiving` (the local end
    /// still takes data); records it as granted.
    pub(crate) fn take_grant(
        &mut self,
        receiving: bool,
        buf: &mut [u8],
    ) -> Result<Option<usize>, BufferTooSmall> {
        let Some(grant) = self.credit.grant_due().filter(|_| receiving) else {
            return Ok(None);
        };
        let n = NativeFrame::Credit {
            stream: self.wire,
            bytes: grant.bytes,
            messages: grant.messages,
        }
        .encode(buf)?;
        self.credit.on_granted(grant);
        Ok(Some(n))
    }
}

impl<M: PayloadBuf, const RING: usize> Pipe<M, RING> {
    /// Queues `message` from the local end toward the tunnel. `admitted` is the shared budget's
    /// verdict ([`crate::engine::admits`]). On refusal the message comes back as
    /// [`SendError::Full`] and the adapter is told (once) to stop reading the local end; the
    /// returned flag says whether this call stopped it, for the caller's log line.
    pub(crate) fn queue_toward_tunnel(
        &mut self,
        budget: &mut Budget,
        admitted: bool,
        message: Message<M>,
    ) -> (Result<(), SendError<M>>, bool) {
        if !admitted {
            if !self.budget_stopped {
                self.budget_stopped = true;
                budget.on_stopped();
            }
            let stopped = self.stop_reading();
            return (Err(SendError::Full(message.payload)), stopped);
        }
        let len = message.payload.len();
        let result = self.to_tunnel.push(message);
        if result.is_ok() {
            budget.on_queued(len);
        }
        let stopped = (result.is_err() || self.to_tunnel.is_full()) && self.stop_reading();
        (
            result.map_err(|full| SendError::Full(full.0.payload)),
            stopped,
        )
    }

    /// Queues a message of `len` bytes from the tunnel for the local end; `make` builds its
    /// buffer once it is admitted (a copy, or a share of an owned frame). `notify`: owe a
    /// "data for the local end" event when the ring was empty (false while the stream opens).
    ///
    /// # Errors
    /// [`PushRefused`]; nothing was queued.
    pub(crate) fn push_from_tunnel(
        &mut self,
        kind: crate::relay::MessageKind,
        len: usize,
        notify: bool,
        make: impl FnOnce() -> Option<M>,
    ) -> Result<(), PushRefused> {
        if !self.credited && !self.to_local.can_accept(len) {
            return Err(PushRefused::Full);
        }
        let payload = make().ok_or(PushRefused::Payload)?;
        let was_empty = self.to_local.is_empty();
        let message = Message { kind, payload };
        // Credited: credit bounds the ring (a message of credit never exceeds its capacity).
        let pushed = if self.credited {
            self.to_local.push_credited(message)
        } else {
            self.to_local.push(message)
        };
        if pushed.is_err() {
            // Unreachable: admission (or credit) was checked above. Refuse rather than lose it.
            return Err(PushRefused::Full);
        }
        if was_empty && notify {
            self.owe_readable = true;
        }
        Ok(())
    }

    /// The next message for the local end, oldest first; its bytes return to the peer as credit.
    pub(crate) fn pop_local(&mut self) -> Option<Message<M>> {
        let message = self.to_local.pop()?;
        if self.credited {
            self.credit.on_consumed(message.payload.len());
        }
        Some(message)
    }
}
