//! Bounded message rings: one per stream per direction.
//!
//! A [`Ring`] holds at most `CAP` messages (const generic, default 100) and at most a runtime byte
//! budget of payload bytes (default 1 MiB, see [`DEFAULT_RING_BYTES`]). A push that would break
//! either limit hands the message back ([`Full`]); nothing is ever dropped, and messages come out
//! in the order they went in.
//!
//! # Memory
//!
//! Without the `alloc` feature messages are stored inline, so a ring costs `CAP * size_of::<T>()`
//! plus five words whether it holds anything or not; the payload bytes live wherever `T` keeps
//! them. An embedded target storing `heapless::Vec<u8, N>` inline pays about `CAP * (N + 16)` and
//! should pick a small `CAP`.
//!
//! With the `alloc` feature (std adapters) the queue lives on the heap and grows on demand up to
//! `CAP`, so a ring that never held anything costs six words and an idle stream costs only its
//! table entry. The limits, the admission rule and the order are identical in both builds.

use core::fmt;

#[cfg(feature = "alloc")]
type Queue<T, const CAP: usize> = alloc::collections::VecDeque<T>;
#[cfg(not(feature = "alloc"))]
type Queue<T, const CAP: usize> = heapless::Deque<T, CAP>;

/// Default per-ring byte budget: 1 MiB.
pub const DEFAULT_RING_BYTES: usize = 1 << 20;

/// Default budget shared by all of a tunnel end's rings toward the tunnel: 64 MiB (see
/// [`crate::budget`]).
pub const DEFAULT_GLOBAL_BYTES: usize = 64 << 20;

/// Default per-ring message capacity.
pub const DEFAULT_RING_MESSAGES: usize = 100;

/// Messages and payload bytes queued in a set of rings (a metrics gauge).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RingOccupancy {
    /// Messages queued.
    pub messages: usize,
    /// Payload bytes queued.
    pub bytes: usize,
}

impl RingOccupancy {
    /// Adds `ring`'s contents.
    pub fn add<T: Payload, const CAP: usize>(&mut self, ring: &Ring<T, CAP>) {
        self.messages += ring.len();
        self.bytes += ring.bytes();
    }
}

/// Something with a size in bytes, counted against a ring's byte budget.
pub trait Payload {
    /// Payload size in bytes.
    fn len(&self) -> usize;

    /// Whether the payload is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<const N: usize> Payload for heapless::Vec<u8, N> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

impl Payload for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

/// A push found the ring full; the message is handed back unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Full<T>(pub T);

impl<T> Full<T> {
    /// The message that was refused.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Display for Full<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring is full")
    }
}

impl<T: fmt::Debug> core::error::Error for Full<T> {}

/// FIFO of at most `CAP` messages and at most `byte_budget` payload bytes.
///
/// Admission rule: a message is accepted when fewer than `CAP` messages are queued and either the
/// ring is empty or the queued bytes plus the message's bytes stay within the budget. An empty ring
/// accepts any single message, however large, so a message bigger than the budget cannot wedge a
/// stream (the relay bounds message size separately).
#[derive(Debug)]
pub struct Ring<T, const CAP: usize = DEFAULT_RING_MESSAGES> {
    items: Queue<T, CAP>,
    bytes: usize,
    byte_budget: usize,
}

impl<T: Payload, const CAP: usize> Ring<T, CAP> {
    /// An empty ring with the given byte budget.
    #[must_use]
    pub const fn new(byte_budget: usize) -> Self {
        Self {
            items: Queue::new(),
            bytes: 0,
            byte_budget,
        }
    }

    /// Queues `item` at the back.
    ///
    /// # Errors
    /// [`Full`] with `item` if the admission rule (see [`Ring`]) refuses it; the ring is unchanged.
    pub fn push(&mut self, item: T) -> Result<(), Full<T>> {
        if !self.can_accept(item.len()) {
            return Err(Full(item));
        }
        let n = item.len();
        self.store(item)?;
        self.bytes += n;
        Ok(())
    }

    #[cfg(feature = "alloc")]
    fn store(&mut self, item: T) -> Result<(), Full<T>> {
        // Grow by small steps: most streams never queue more than a few messages.
        if self.items.len() == self.items.capacity() {
            let want = (self.items.len() * 2).max(4).min(CAP);
            self.items.reserve_exact(want - self.items.len());
        }
        self.items.push_back(item);
        Ok(())
    }

    #[cfg(not(feature = "alloc"))]
    fn store(&mut self, item: T) -> Result<(), Full<T>> {
        self.items.push_back(item).map_err(Full)
    }

    /// Queues `item` at the back, checking only the message capacity: for flows whose bytes are
    /// already bounded by credit (native mode), where the sender may overshoot the byte budget by
    /// less than one message.
    ///
    /// # Errors
    /// [`Full`] with `item` if `CAP` messages are queued; the ring is unchanged.
    pub fn push_credited(&mut self, item: T) -> Result<(), Full<T>> {
        if self.items.len() >= CAP {
            return Err(Full(item));
        }
        let n = item.len();
        self.store(item)?;
        self.bytes += n;
        Ok(())
    }

    /// Removes and returns the oldest message.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.bytes -= item.len();
        Some(item)
    }

    /// The oldest message, left in place.
    #[must_use]
    pub fn front(&self) -> Option<&T> {
        self.items.front()
    }

    /// Whether a message of `bytes` payload bytes would be accepted now.
    #[must_use]
    pub fn can_accept(&self, bytes: usize) -> bool {
        self.items.len() < CAP
            && (self.items.is_empty() || self.bytes.saturating_add(bytes) <= self.byte_budget)
    }

    /// Whether no further non-empty message can be accepted (message or byte limit reached).
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.items.len() >= CAP || (!self.items.is_empty() && self.bytes >= self.byte_budget)
    }

    /// Whether the ring is at most half full by both measures: the point where a paused producer
    /// may resume without flapping.
    #[must_use]
    pub fn is_below_half(&self) -> bool {
        self.items.len() <= CAP / 2 && self.bytes <= self.byte_budget / 2
    }

    /// Number of queued messages.
    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queued payload bytes.
    #[must_use]
    pub const fn bytes(&self) -> usize {
        self.bytes
    }

    /// The byte budget.
    #[must_use]
    pub const fn byte_budget(&self) -> usize {
        self.byte_budget
    }

    /// The message capacity, `CAP`.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        CAP
    }

    /// Drops everything queued; returns how many messages and bytes were discarded.
    pub fn clear(&mut self) -> (usize, usize) {
        let discarded = (self.items.len(), self.bytes);
        self.items = Queue::new();
        self.bytes = 0;
        discarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::vec::Vec;

    type Msg = heapless::Vec<u8, 64>;

    fn msg(tag: u8, len: usize) -> Msg {
        let mut m = Msg::new();
        m.resize(len, tag).unwrap();
        m
    }

    #[test]
    fn message_limit_hands_back() {
        let mut r: Ring<Msg, 2> = Ring::new(1000);
        r.push(msg(1, 1)).unwrap();
        r.push(msg(2, 1)).unwrap();
        assert!(r.is_full());
        assert_eq!(r.push(msg(3, 1)), Err(Full(msg(3, 1))));
        assert_eq!(r.pop(), Some(msg(1, 1)));
        r.push(msg(3, 1)).unwrap();
        assert_eq!(r.pop(), Some(msg(2, 1)));
        assert_eq!(r.pop(), Some(msg(3, 1)));
        assert_eq!(r.pop(), None);
    }

    #[test]
    fn byte_budget_hands_back_but_empty_ring_takes_anything() {
        let mut r: Ring<Msg, 8> = Ring::new(10);
        r.push(msg(1, 40)).unwrap(); // empty ring: accepted although above budget
        assert!(r.is_full());
        assert_eq!(r.push(msg(2, 1)).unwrap_err().into_inner(), msg(2, 1));
        r.pop().unwrap();
        r.push(msg(3, 6)).unwrap();
        assert!(r.can_accept(4) && !r.can_accept(5));
        assert!(r.push(msg(4, 5)).is_err());
        assert_eq!((r.len(), r.bytes()), (1, 6));
        assert_eq!(r.clear(), (1, 6));
        assert!(r.is_empty());
    }

    #[test]
    fn half_mark() {
        let mut r: Ring<Msg, 4> = Ring::new(100);
        for i in 0..4 {
            r.push(msg(i, 1)).unwrap();
        }
        assert!(!r.is_below_half());
        r.pop();
        assert!(!r.is_below_half());
        r.pop();
        assert!(r.is_below_half());
    }

    proptest! {
        /// Any interleaving of pushes and pops: never above either limit, FIFO, and every message
        /// is either queued, popped, or handed back to the caller (nothing lost or duplicated).
        #[test]
        fn no_loss_fifo_bounded(ops in proptest::collection::vec((any::<bool>(), 0usize..40), 0..400),
                                budget in 0usize..200) {
            let mut r: Ring<Msg, 7> = Ring::new(budget);
            let mut model: VecDeque<Msg> = VecDeque::new();
            let mut popped: Vec<Msg> = Vec::new();
            let mut next = 0u8;
            for (push, len) in ops {
                if push {
                    let m = msg(next, len);
                    next = next.wrapping_add(1);
                    match r.push(m.clone()) {
                        Ok(()) => model.push_back(m),
                        Err(Full(back)) => {
                            prop_assert_eq!(&back, &m);
                            prop_assert!(model.len() == 7 || (!model.is_empty()
                                && model.iter().map(Msg::len).sum::<usize>() + len > budget));
                        }
                    }
                } else {
                    let got = r.pop();
                    prop_assert_eq!(&got, &model.pop_front());
                    popped.extend(got);
                }
                let bytes: usize = model.iter().map(Msg::len).sum();
                prop_assert!(r.len() <= 7);
                prop_assert_eq!(r.len(), model.len());
                prop_assert_eq!(r.bytes(), bytes);
                // Above budget only with a single (oversize) message.
                prop_assert!(bytes <= budget || r.len() == 1);
            }
            while let Some(m) = r.pop() {
                prop_assert_eq!(Some(m), model.pop_front());
            }
            prop_assert!(model.is_empty());
        }
    }
}
