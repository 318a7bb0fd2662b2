//! Per-stream credit windows of the native wire mode, shared by the agent relay and the control
//! plane gateway.
//!
//! Each end of a stream owns a receive ring toward its local consumer (the upstream socket on the
//! agent, the client on the control plane). It grants its peer credit for what that ring can hold
//! (`RING` messages and the ring's byte budget) and grants again as its consumer drains the ring,
//! so a stalled consumer stops only its own stream: the sender runs out of credit for that stream
//! and keeps sending for every other. No tunnel read is ever paused in native mode.
//!
//! # Rules (both ends apply the same ones)
//! * A data message may be sent while the sender holds at least one message of credit and a
//!   positive byte credit; sending takes one message and the message's length in bytes, so byte
//!   credit can go below zero by less than one message. A receive ring therefore holds at most its
//!   byte budget plus one message.
//! * The receiver mirrors the sender's credit and refuses a message sent without credit
//!   ([`CreditError`]): a peer breaking the rules loses that stream, nothing else.
//! * Grants are increments, sent once the consumer drained a quarter of the window (by messages
//!   or by bytes), and counted toward the peer's credit when they are *transmitted*. A new stream
//!   starts with a pending grant of the whole window.

use core::fmt;

use crate::time::{Duration, Instant};

pub use crate::engine::AckError;

/// Messages at most this long go ahead of bulk data on the tunnel (both modes): tty input,
/// terminal resizes, small round trips. Streams share the tunnel round-robin within each class.
pub const INTERACTIVE_MAX: usize = 1024;

/// A data message arrived for a stream whose sender had no credit left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CreditError {
    /// Payload size of the refused message.
    pub len: usize,
}

impl fmt::Display for CreditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data message of {} bytes sent without credit (flow control violated)",
            self.len
        )
    }
}

impl core::error::Error for CreditError {}

/// A grant to transmit: increments of the peer's byte and message credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Grant {
    /// Bytes granted.
    pub bytes: u32,
    /// Messages granted.
    pub messages: u32,
}

/// Credit state of one stream, both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Credit {
    send_messages: u32,
    send_bytes: i64,
    recv_messages: u32,
    recv_bytes: i64,
    grant_messages: u32,
    grant_bytes: u64,
    window_messages: u32,
    window_bytes: u64,
    blocked_since: Option<Instant>,
}

impl Credit {
    /// No credit and no window (compat streams).
    pub(crate) const ZERO: Self = Self {
        send_messages: 0,
        send_bytes: 0,
        recv_messages: 0,
        recv_bytes: 0,
        grant_messages: 0,
        grant_bytes: 0,
        window_messages: 0,
        window_bytes: 0,
        blocked_since: None,
    };

    /// A stream whose receive ring holds `messages` messages and `bytes` bytes: the whole window is
    /// owed to the peer as the first grant. Nothing may be sent before the peer's first grant.
    pub(crate) fn new(messages: usize, bytes: usize) -> Self {
        let window_messages = u32::try_from(messages).unwrap_or(u32::MAX);
        let window_bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        Self {
            grant_messages: window_messages,
            grant_bytes: u64::from(window_bytes),
            window_messages,
            window_bytes: u64::from(window_bytes),
            ..Self::ZERO
        }
    }

    /// Whether a data message may be sent now.
    pub(crate) const fn can_send(&self) -> bool {
        self.send_messages >= 1 && self.send_bytes > 0
    }

    /// A data message of `len` bytes was sent.
    pub(crate) fn on_sent(&mut self, len: usize) {
        self.send_messages = self.send_messages.saturating_sub(1);
        self.send_bytes = self.send_bytes.saturating_sub(len as i64);
    }

    /// The stream has data to send but no credit: starts the blocked clock. Returns whether this
    /// began a stall (for counting).
    pub(crate) fn mark_blocked(&mut self, now: Instant) -> bool {
        if self.blocked_since.is_some() {
            return false;
        }
        self.blocked_since = Some(now);
        true
    }

    /// The peer granted credit. Returns how long the stream had been blocked, if it was.
    pub(crate) fn on_grant(&mut self, now: Instant, bytes: u32, messages: u32) -> Option<Duration> {
        self.send_messages = self.send_messages.saturating_add(messages);
        self.send_bytes = self.send_bytes.saturating_add(i64::from(bytes));
        let since = self.blocked_since.take()?;
        Some(now.saturating_duration_since(since))
    }

    /// A data message of `len` bytes arrived from the peer.
    ///
    /// # Errors
    /// [`CreditError`] when the peer had no credit for it (the message must be refused).
    pub(crate) fn on_received(&mut self, len: usize) -> Result<(), CreditError> {
        if self.recv_messages < 1 || self.recv_bytes <= 0 {
            return Err(CreditError { len });
        }
        self.recv_messages -= 1;
        self.recv_bytes = self.recv_bytes.saturating_sub(len as i64);
        Ok(())
    }

    /// The local consumer took a message of `len` bytes out of the receive ring.
    pub(crate) fn on_consumed(&mut self, len: usize) {
        self.grant_messages = self.grant_messages.saturating_add(1);
        self.grant_bytes = self.grant_bytes.saturating_add(len as u64);
    }

    /// The grant owed now, if a quarter of the window (by messages or bytes) was consumed.
    pub(crate) fn grant_due(&self) -> Option<Grant> {
        let messages_due = self.grant_messages >= (self.window_messages / 4).max(1);
        let bytes_due = self.grant_bytes >= (self.window_bytes / 4).max(1);
        (messages_due || bytes_due).then(|| Grant {
            bytes: u32::try_from(self.grant_bytes).unwrap_or(u32::MAX),
            messages: self.grant_messages,
        })
    }

    /// `grant` (from [`grant_due`](Self::grant_due)) was transmitted: the peer may now use it.
    pub(crate) fn on_granted(&mut self, grant: Grant) {
        self.grant_messages -= grant.messages.min(self.grant_messages);
        self.grant_bytes -= u64::from(grant.bytes).min(self.grant_bytes);
        self.recv_messages = self.recv_messages.saturating_add(grant.messages);
        self.recv_bytes = self.recv_bytes.saturating_add(i64::from(grant.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(us: u64) -> Instant {
        Instant::from_micros(us)
    }

    #[test]
    fn nothing_is_sent_before_the_first_grant() {
        let mut c = Credit::new(4, 100);
        assert!(!c.can_send());
        assert!(c.mark_blocked(t(10)));
        assert!(!c.mark_blocked(t(20)));
        let blocked = c.on_grant(t(60), 100, 4);
        assert_eq!(blocked, Some(Duration::from_micros(50)));
        assert!(c.can_send());
    }

    #[test]
    fn the_first_grant_is_the_whole_window() {
        let mut c = Credit::new(4, 100);
        let g = c.grant_due().unwrap();
        assert_eq!(
            g,
            Grant {
                bytes: 100,
                messages: 4
            }
        );
        c.on_granted(g);
        assert_eq!(c.grant_due(), None);
        for _ in 0..4 {
            c.on_received(10).unwrap();
        }
        assert_eq!(c.on_received(1), Err(CreditError { len: 1 }));
    }

    #[test]
    fn byte_credit_may_overshoot_by_one_message() {
        let mut peer = Credit::new(100, 100);
        let mut me = Credit::new(100, 100);
        let g = peer.grant_due().unwrap();
        peer.on_granted(g);
        me.on_grant(t(0), g.bytes, g.messages);
        assert!(me.can_send());
        me.on_sent(99);
        peer.on_received(99).unwrap();
        assert!(me.can_send());
        me.on_sent(500);
        peer.on_received(500).unwrap();
        assert!(!me.can_send());
        assert!(peer.on_received(1).is_err());
    }

    #[test]
    fn grants_follow_the_consumer() {
        let mut c = Credit::new(8, 1000);
        c.on_granted(c.grant_due().unwrap());
        c.on_consumed(10);
        assert_eq!(c.grant_due(), None);
        c.on_consumed(10);
        assert_eq!(
            c.grant_due(),
            Some(Grant {
                bytes: 20,
                messages: 2
            })
        );
        c.on_consumed(300);
        assert_eq!(
            c.grant_due(),
            Some(Grant {
                bytes: 320,
                messages: 3
            })
        );
    }

    proptest! {
        /// A sender and a receiver following the rules never disagree, the receive ring never
        /// holds more than the window plus one message, and everything sent is delivered.
        #[test]
        fn sender_and_receiver_agree(
            window_messages in 1usize..20,
            window_bytes in 1usize..5000,
            ops in proptest::collection::vec((0u8..3, 0usize..3000), 1..400),
        ) {
            let mut tx = Credit::new(window_messages, window_bytes);
            let mut rx = Credit::new(window_messages, window_bytes);
            let max_len = 3000;
            let mut queue = std::collections::VecDeque::new();
            let mut queued_bytes = 0usize;
            let mut in_flight_grants = std::collections::VecDeque::new();
            let (mut sent, mut delivered) = (0u64, 0u64);
            for (op, len) in ops {
                match op {
                    0 => if tx.can_send() {
                        tx.on_sent(len);
                        prop_assert!(rx.on_received(len).is_ok());
                        queue.push_back(len);
                        queued_bytes += len;
                        sent += 1;
                        prop_assert!(queue.len() <= window_messages);
                        prop_assert!(queued_bytes < window_bytes + max_len);
                    },
                    1 => if let Some(len) = queue.pop_front() {
                        queued_bytes -= len;
                        rx.on_consumed(len);
                        delivered += 1;
                    },
                    _ => {
                        if let Some(g) = rx.grant_due() {
                            rx.on_granted(g);
                            in_flight_grants.push_back(g);
                        }
                        if let Some(g) = in_flight_grants.pop_front() {
                            tx.on_grant(t(0), g.bytes, g.messages);
                        }
                    }
                }
            }
            // Drain: the consumer empties the ring, grants flow, nothing is stuck.
            while let Some(len) = queue.pop_front() {
                rx.on_consumed(len);
                delivered += 1;
            }
            prop_assert_eq!(sent, delivered);
            while let Some(g) = in_flight_grants.pop_front() {
                tx.on_grant(t(0), g.bytes, g.messages);
            }
            if let Some(g) = rx.grant_due() {
                rx.on_granted(g);
                tx.on_grant(t(0), g.bytes, g.messages);
            }
            prop_assert!(tx.can_send(), "an idle, drained stream always has credit");
        }
    }
}
