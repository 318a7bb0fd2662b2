//! A byte budget shared by every stream's ring toward the tunnel.
//!
//! Each ring has its own budget, so with many streams the rings together could hold
//! `streams × ring budget` bytes when the tunnel is slower than the local producers (1 000 kubectl
//! clients each sending 1 MiB at once would park 1 GiB in the control plane). The shared budget
//! caps the sum: once the rings toward the tunnel hold `limit` bytes together, a stream may only
//! queue more while it holds less than its fair share (`limit / live streams`, at least
//! [`MIN_SHARE`]) or nothing at all, so a few busy (or stalled) streams cannot starve the rest
//! and every stream keeps moving. A refused producer is told to stop reading, and to resume once
//! its own ring is empty or the rings together drained below three quarters of the limit.
//! Streams that filled up while the total was under the limit keep what they hold, so the rings
//! together hold at most about twice the limit (plus one message per stream).
//!
//! The total is tracked as an upper bound (pushes add, drains are not counted) and recomputed
//! exactly, by walking the streams, only when that bound says the limit may be reached.

/// Bytes a stream may always queue toward the tunnel, whatever the other streams hold.
pub const MIN_SHARE: usize = 64 * 1024;

/// The shared budget's state. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    limit: usize,
    /// At least the bytes queued in all rings toward the tunnel.
    bound: usize,
    /// Streams told to stop reading because of the budget.
    stopped: usize,
}

impl Budget {
    pub(crate) const fn new(limit: usize) -> Self {
        Self {
            limit,
            bound: 0,
            stopped: 0,
        }
    }

    /// Whether a stream holding `own` bytes may queue `len` more, with `live` streams open;
    /// `total` computes the exact bytes queued in all rings (called only near the limit).
    pub(crate) fn admits(
        &mut self,
        own: usize,
        len: usize,
        live: usize,
        total: impl FnOnce() -> usize,
    ) -> bool {
        if self.bound.saturating_add(len) <= self.limit {
            return true;
        }
        self.bound = total();
        if self.bound.saturating_add(len) <= self.limit {
            return true;
        }
        // An empty ring always takes one message, as a ring does on its own: a stream never
        // waits on what other streams hold.
        let share = (self.limit / live.max(1)).max(MIN_SHARE);
        own == 0 || own.saturating_add(len) <= share
    }

    /// `len` bytes were queued.
    pub(crate) fn on_queued(&mut self, len: usize) {
        self.bound = self.bound.saturating_add(len);
    }

    /// A stream was told to stop reading because of the budget.
    pub(crate) fn on_stopped(&mut self) {
        self.stopped += 1;
    }

    /// A stream stopped by the budget no longer is (its ring emptied, or it was freed), other
    /// than through [`take_resume`](Self::take_resume).
    pub(crate) fn on_unstopped(&mut self) {
        self.stopped = self.stopped.saturating_sub(1);
    }

    /// Whether the streams stopped by the budget may resume (the rings drained below three
    /// quarters of the limit); if so, the caller resumes them all and the count restarts.
    /// `total` computes the exact bytes queued (called only while some stream is stopped).
    pub(crate) fn take_resume(&mut self, total: impl FnOnce() -> usize) -> bool {
        if self.stopped == 0 {
            return false;
        }
        self.bound = total();
        if self.bound > self.limit / 4 * 3 {
            return false;
        }
        self.stopped = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_the_limit_everything_is_admitted_without_counting() {
        let mut b = Budget::new(1000);
        assert!(b.admits(0, 400, 10, || unreachable!()));
        b.on_queued(400);
        assert!(b.admits(400, 600, 10, || unreachable!()));
    }

    #[test]
    fn over_the_limit_only_streams_under_their_share_queue() {
        let mut b = Budget::new(4 * MIN_SHARE);
        b.on_queued(4 * MIN_SHARE);
        // Exactly full: a stream over MIN_SHARE is refused, one under it is admitted.
        assert!(!b.admits(MIN_SHARE, 1, 8, || 4 * MIN_SHARE));
        assert!(b.admits(MIN_SHARE - 10, 10, 8, || 4 * MIN_SHARE));
        // An empty ring takes one message of any size.
        assert!(b.admits(0, 10 * MIN_SHARE, 8, || 4 * MIN_SHARE));
        // The bound is refreshed: after drains the exact total admits again.
        assert!(b.admits(MIN_SHARE, 1, 8, || MIN_SHARE));
    }

    #[test]
    fn fair_share_grows_with_fewer_streams() {
        let mut b = Budget::new(8 * MIN_SHARE);
        b.on_queued(8 * MIN_SHARE);
        // Two streams: each may hold half the budget.
        assert!(b.admits(3 * MIN_SHARE, MIN_SHARE, 2, || 8 * MIN_SHARE));
        assert!(!b.admits(4 * MIN_SHARE, 1, 2, || 8 * MIN_SHARE));
    }

    #[test]
    fn no_walk_once_every_stopped_stream_is_unstopped() {
        let mut b = Budget::new(1000);
        b.on_stopped();
        b.on_stopped();
        b.on_unstopped();
        assert!(!b.take_resume(|| 900));
        b.on_unstopped();
        assert!(!b.take_resume(|| unreachable!()));
    }

    #[test]
    fn stopped_streams_resume_below_three_quarters() {
        let mut b = Budget::new(1000);
        assert!(!b.take_resume(|| unreachable!()));
        b.on_stopped();
        assert!(!b.take_resume(|| 800));
        assert!(b.take_resume(|| 750));
        assert!(!b.take_resume(|| 0));
    }
}
