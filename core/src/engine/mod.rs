//! The stream engine both ends of the tunnel share.
//!
//! The agent ([`crate::relay::Relay`]) and the control plane ([`crate::gateway::Gateway`]) are
//! two roles of one engine: each keeps a [`StreamTable`] whose entries carry a [`Pipe`] (the data
//! path: a ring each way, credit, stop/resume reading) beside what only that role knows (its
//! lifecycle and the control messages it owes). Everything that moves bytes is written once,
//! here and in [`Pipe`]:
//!
//! * admission of local-end data against the ring and the shared byte [`Budget`] ([`admits`],
//!   [`Pipe::queue_toward_tunnel`]) and the resume that follows a send ([`sent_front`]);
//! * admission of tunnel data toward the local end, by credit or by pausing the tunnel
//!   ([`Pipe::push_from_tunnel`], [`Pipe::pop_local`]);
//! * native data frames within credit ([`transmit_native_data`]), credit grants
//!   ([`Pipe::take_grant`]) and the interactive-first test of the scheduler
//!   ([`Pipe::front_is_interactive`]).
//!
//! Directions are named from the role's own side: *toward the tunnel* is what its local end
//! (the Kubernetes API upstream on the agent, the kubectl client on the control plane) sent;
//! *toward the local end* is what came out of the tunnel.

mod pipe;
mod window;

pub(crate) use pipe::{Pipe, PushRefused};
pub use window::AckError;
pub(crate) use window::Window;

use crate::budget::Budget;
use crate::credit::INTERACTIVE_MAX;
use crate::flow::Flow;
use crate::relay::{Message, PayloadBuf, Transmit, TransmitError};
use crate::table::{Slot, StreamTable};
use crate::time::Instant;
use crate::wire::native;

/// A role's per-stream data: it carries a [`Pipe`].
pub(crate) trait Carries<M, const RING: usize> {
    fn pipe(&self) -> &Pipe<M, RING>;
    fn pipe_mut(&mut self) -> &mut Pipe<M, RING>;
}

/// Bytes queued toward the tunnel in every stream's ring.
pub(crate) fn bytes_to_tunnel<D, M, const STREAMS: usize, const RING: usize>(
    streams: &StreamTable<D, STREAMS>,
) -> usize
where
    D: Carries<M, RING>,
    M: PayloadBuf,
{
    streams
        .iter()
        .map(|(_, e)| e.value.pipe().to_tunnel.bytes())
        .sum()
}

/// The shared budget's verdict on `len` more bytes from the local end of `slot`.
pub(crate) fn admits<D, M, const STREAMS: usize, const RING: usize>(
    streams: &StreamTable<D, STREAMS>,
    budget: &mut Budget,
    slot: Slot,
    len: usize,
) -> bool
where
    D: Carries<M, RING>,
    M: PayloadBuf,
{
    let own = streams
        .at(slot)
        .map_or(0, |e| e.value.pipe().to_tunnel.bytes());
    budget.admits(own, len, streams.len(), || bytes_to_tunnel(streams))
}

/// The front message toward the tunnel of `slot` was sent: takes it out (returned) and lets the
/// local end be read again once its ring is below half, or every budget-stopped stream once the
/// rings together drained (see [`crate::budget`]).
pub(crate) fn sent_front<D, M, const STREAMS: usize, const RING: usize>(
    streams: &mut StreamTable<D, STREAMS>,
    budget: &mut Budget,
    slot: Slot,
) -> Option<Message<M>>
where
    D: Carries<M, RING>,
    M: PayloadBuf,
{
    let p = streams.at_mut(slot)?.value.pipe_mut();
    let message = p.to_tunnel.pop()?;
    if p.budget_stopped && p.to_tunnel.is_empty() {
        // Its own ring is empty: the shared budget admits it again.
        p.budget_stopped = false;
        budget.on_unstopped();
    }
    if p.reading_stopped && !p.budget_stopped && p.to_tunnel.is_below_half() {
        p.reading_stopped = false;
        p.flow = Some(Flow::Resume);
    }
    if budget.take_resume(|| bytes_to_tunnel(streams)) {
        for (_, entry) in streams.iter_mut() {
            let p = entry.value.pipe_mut();
            if core::mem::take(&mut p.budget_stopped)
                && p.reading_stopped
                && p.to_tunnel.is_below_half()
            {
                p.reading_stopped = false;
                p.flow = Some(Flow::Resume);
            }
        }
    }
    Some(message)
}

/// Encodes the ack owed to the peer, if one is due (see [`Window`]).
///
/// # Errors
/// [`TransmitError::BufferTooSmall`]; nothing sent.
pub(crate) fn transmit_ack(
    window: &mut Window,
    buf: &mut [u8],
) -> Result<Option<usize>, TransmitError> {
    let Some(received) = window.ack_due() else {
        return Ok(None);
    };
    let n = native::NativeFrame::Ack { received }.encode(buf)?;
    window.on_ack_sent(received);
    Ok(Some(n))
}

/// What [`transmit_native_data`] sent.
pub(crate) struct NativeSent<M> {
    pub(crate) transmit: Transmit<M>,
    /// Payload bytes.
    pub(crate) len: usize,
}

/// Sends the front data message of native stream `slot` if it holds credit and, for a bulk
/// message, the tunnel's [`Window`] lets it go (copied into `buf` after its header, or handed
/// out whole when `owned`); without credit it starts its blocked clock, counts a stall in
/// `stalls` when one begins, and sends nothing.
///
/// # Errors
/// [`TransmitError::BufferTooSmall`] when a copied message does not fit `buf`; nothing sent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transmit_native_data<D, M, const STREAMS: usize, const RING: usize>(
    streams: &mut StreamTable<D, STREAMS>,
    budget: &mut Budget,
    window: &mut Window,
    slot: Slot,
    now: Instant,
    buf: &mut [u8],
    owned: bool,
    stalls: &mut u64,
) -> Result<Option<NativeSent<M>>, TransmitError>
where
    D: Carries<M, RING>,
    M: PayloadBuf,
{
    let Some(entry) = streams.at_mut(slot) else {
        return Ok(None);
    };
    let p = entry.value.pipe_mut();
    if !p.credit.can_send() {
        if p.credit.mark_blocked(now) {
            *stalls += 1;
        }
        return Ok(None);
    }
    let Some(message) = p.to_tunnel.front() else {
        return Ok(None);
    };
    let kind = message.kind.into();
    let len = message.payload.len();
    if len > INTERACTIVE_MAX && !window.allows_bulk(len) {
        return Ok(None);
    }
    let transmit = if owned {
        let header = native::data_header(p.wire, kind);
        p.credit.on_sent(len);
        let Some(message) = sent_front(streams, budget, slot) else {
            return Ok(None);
        };
        Transmit::Data {
            header,
            payload: message.payload,
        }
    } else {
        let n = native::encode_data_header(buf, p.wire, kind, len)?;
        buf[native::HEADER_LEN..n].copy_from_slice(message.payload.as_bytes());
        p.credit.on_sent(len);
        let _ = sent_front(streams, budget, slot);
        Transmit::Encoded(n)
    };
    window.on_sent(now, len);
    Ok(Some(NativeSent { transmit, len }))
}
