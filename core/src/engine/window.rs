//! The tunnel's bulk window: how many data bytes one end may have in flight toward the other,
//! sized to what the path needs (measured bandwidth times delay).
//!
//! Per-stream credit bounds what each stream may have outstanding (its ring at the receiver);
//! with many busy streams the sum of those windows would sit in kernel socket buffers, and an
//! interactive frame sent now would wait behind all of it. With the `native_ack` extension each
//! end reports the data payload bytes it received so far ([`NativeFrame::Ack`]), at least every
//! [`ACK_EVERY`] bytes. The sender keeps `sent - acked` (bytes in flight, in kernel buffers and
//! in the adapters' queues) under a limit for *bulk* messages; interactive messages
//! ([`crate::credit::INTERACTIVE_MAX`] bytes or less) are counted but never held back.
//!
//! The limit follows BBR's model: every round trip one probe measures the delivery rate (bytes
//! acked over the probe's time) and the round-trip time; the limit is twice the highest recent
//! rate times the lowest recent round trip, within [[`MIN_LIMIT`], [`MAX_LIMIT`]]. When the
//! path is free the limit doubles per round trip; once a queue forms the rate stops growing
//! while the round trip grows, so the queue stays near one bandwidth-delay product.
//!
//! Never a deadlock: a bulk message may always go while less than [`ACK_EVERY`] bytes are
//! unacknowledged (the receiver may be holding back an ack for fewer bytes than that).
//!
//! [`NativeFrame::Ack`]: crate::wire::native::NativeFrame::Ack

use crate::time::{Duration, Instant};

/// The receiver acknowledges at least every this many received data bytes.
pub(crate) const ACK_EVERY: u64 = 64 * 1024;
/// The smallest bulk limit.
pub(crate) const MIN_LIMIT: u64 = 256 * 1024;
/// The largest bulk limit.
pub(crate) const MAX_LIMIT: u64 = 16 * 1024 * 1024;
/// How long a minimum round trip stays valid before the next sample replaces it.
const RTT_VALID: Duration = Duration::from_secs(10);
/// Delivery-rate samples kept for the maximum filter (one per round trip).
const RATE_SAMPLES: usize = 8;

/// Why an ack was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AckError {
    /// It reports more bytes than were ever sent, or fewer than an earlier ack.
    Impossible {
        /// What the ack says was received.
        received: u64,
        /// What was sent.
        sent: u64,
    },
}

impl core::fmt::Display for AckError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Impossible { received, sent } => write!(
                f,
                "ack for {received} bytes does not match the {sent} bytes sent"
            ),
        }
    }
}

impl core::error::Error for AckError {}

/// An open probe: when the byte at `sent` went out, and what was acked then.
#[derive(Clone, Copy, Debug)]
struct Probe {
    sent: u64,
    at: Instant,
    acked: u64,
}

/// Both halves of one end's window: what it sent (bounded by acks) and what it received (to
/// acknowledge). Inert until [`enable`](Self::enable): without the extension nothing is
/// bounded and no ack is owed.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    enabled: bool,
    sent: u64,
    acked: u64,
    probe: Option<Probe>,
    min_rtt: Option<(Duration, Instant)>,
    rates: [u64; RATE_SAMPLES],
    next_rate: usize,
    limit: u64,
    received: u64,
    acked_to_peer: u64,
}

impl Window {
    pub(crate) const fn new() -> Self {
        Self {
            enabled: false,
            sent: 0,
            acked: 0,
            probe: None,
            min_rtt: None,
            rates: [0; RATE_SAMPLES],
            next_rate: 0,
            limit: MIN_LIMIT,
            received: 0,
            acked_to_peer: 0,
        }
    }

    /// Both ends agreed on `native_ack`: bound bulk data and acknowledge from now on.
    pub(crate) fn enable(&mut self) {
        self.enabled = true;
    }

    /// Whether a bulk message of `len` bytes may be sent now.
    pub(crate) fn allows_bulk(&self, len: usize) -> bool {
        let in_flight = self.in_flight();
        !self.enabled || in_flight < ACK_EVERY || in_flight + len as u64 <= self.limit
    }

    /// A data message of `len` payload bytes was sent at `now`.
    pub(crate) fn on_sent(&mut self, now: Instant, len: usize) {
        self.sent += len as u64;
        if self.enabled && self.probe.is_none() {
            self.probe = Some(Probe {
                sent: self.sent,
                at: now,
                acked: self.acked,
            });
        }
    }

    /// The peer acknowledged `received` bytes at `now`.
    pub(crate) fn on_ack(&mut self, now: Instant, received: u64) -> Result<(), AckError> {
        if received > self.sent || received < self.acked {
            return Err(AckError::Impossible {
                received,
                sent: self.sent,
            });
        }
        self.acked = received;
        let Some(probe) = self.probe.filter(|p| received >= p.sent) else {
            return Ok(());
        };
        let rtt = now.saturating_duration_since(probe.at);
        let fresh = self
            .min_rtt
            .is_none_or(|(min, at)| rtt <= min || now.saturating_duration_since(at) > RTT_VALID);
        if fresh {
            self.min_rtt = Some((rtt, now));
        }
        let micros = rtt.as_micros().max(1);
        let rate = (received - probe.acked).saturating_mul(1_000_000) / micros;
        self.rates[self.next_rate] = rate;
        self.next_rate = (self.next_rate + 1) % RATE_SAMPLES;
        let best = self.rates.iter().copied().max().unwrap_or(0);
        let min_rtt = self.min_rtt.map_or(micros, |(d, _)| d.as_micros().max(1));
        let bdp = best.saturating_mul(min_rtt) / 1_000_000;
        self.limit = bdp.saturating_mul(2).clamp(MIN_LIMIT, MAX_LIMIT);
        self.probe = (self.sent > received).then_some(Probe {
            sent: self.sent,
            at: now,
            acked: received,
        });
        Ok(())
    }

    /// `len` data payload bytes were received from the peer.
    pub(crate) fn on_received(&mut self, len: usize) {
        self.received += len as u64;
    }

    /// The ack owed to the peer, if one is due: the total received, once [`ACK_EVERY`] bytes
    /// arrived since the last ack.
    pub(crate) fn ack_due(&self) -> Option<u64> {
        (self.enabled && self.received - self.acked_to_peer >= ACK_EVERY).then_some(self.received)
    }

    /// The ack for `received` was sent.
    pub(crate) fn on_ack_sent(&mut self, received: u64) {
        self.acked_to_peer = received;
    }

    /// Bytes sent and not acknowledged.
    pub(crate) const fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }

    /// The current bulk limit in bytes.
    pub(crate) const fn limit(&self) -> u64 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: u64) -> Instant {
        Instant::from_micros(micros)
    }

    #[test]
    fn inert_until_enabled() {
        let mut w = Window::new();
        w.on_sent(at(0), 100 << 20);
        assert!(w.allows_bulk(1 << 20));
        w.on_received(1 << 20);
        assert_eq!(w.ack_due(), None);
    }

    #[test]
    fn bulk_waits_for_acks_past_the_limit() {
        let mut w = Window::new();
        w.enable();
        let mut sent = 0;
        while w.allows_bulk(32 * 1024) {
            w.on_sent(at(0), 32 * 1024);
            sent += 32 * 1024;
        }
        assert_eq!(sent, MIN_LIMIT);
        assert_eq!(w.in_flight(), MIN_LIMIT);
        w.on_ack(at(100), 64 * 1024).unwrap();
        assert!(w.allows_bulk(32 * 1024));
    }

    #[test]
    fn a_small_unacked_rest_never_blocks() {
        let mut w = Window::new();
        w.enable();
        w.on_sent(at(0), (ACK_EVERY - 1) as usize);
        // A message far over the limit still goes: the receiver owes no ack for the rest.
        assert!(w.allows_bulk(4 << 20));
        w.on_sent(at(0), 4 << 20);
        assert!(!w.allows_bulk(1));
    }

    #[test]
    fn limit_tracks_rate_times_round_trip() {
        let mut w = Window::new();
        w.enable();
        // 100 MB/s over a 1 ms round trip: 100 KB in flight per round trip.
        let mut now = 0;
        for _ in 0..20 {
            w.on_sent(at(now), 100_000);
            now += 1000;
            let acked = w.in_flight() + w.acked;
            w.on_ack(at(now), acked).unwrap();
        }
        // Rate 100 MB/s x min RTT 1 ms = 100 KB; twice that is under the floor.
        assert_eq!(w.limit(), MIN_LIMIT);
        // 1 GB/s over 1 ms: 1 MB per round trip, limit 2 MB.
        for _ in 0..20 {
            w.on_sent(at(now), 1_000_000);
            now += 1000;
            let acked = w.sent;
            w.on_ack(at(now), acked).unwrap();
        }
        assert_eq!(w.limit(), 2_000_000);
    }

    #[test]
    fn receiver_acks_every_ack_every_bytes() {
        let mut w = Window::new();
        w.enable();
        w.on_received((ACK_EVERY - 1) as usize);
        assert_eq!(w.ack_due(), None);
        w.on_received(1);
        assert_eq!(w.ack_due(), Some(ACK_EVERY));
        w.on_ack_sent(ACK_EVERY);
        assert_eq!(w.ack_due(), None);
    }

    #[test]
    fn impossible_acks_are_refused() {
        let mut w = Window::new();
        w.enable();
        w.on_sent(at(0), 10);
        assert!(w.on_ack(at(1), 11).is_err());
        w.on_ack(at(1), 8).unwrap();
        assert!(w.on_ack(at(2), 7).is_err());
    }
}
