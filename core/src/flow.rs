//! Reading flow notices shared by the relay and the gateway.

use crate::time::{Duration, Instant};

/// A pending "stop/resume reading" notice; a later notice replaces an unpolled earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Stop,
    Resume,
}

/// The tunnel reader's pause: what it waits for (`B`, the caller's blocker) and the
/// pause/resume notice owed to the adapter.
#[derive(Debug)]
pub(crate) struct TunnelPause<B> {
    blocked: Option<B>,
    notice: Option<Flow>,
    /// When the current pause began.
    since: Option<Instant>,
}

impl<B> TunnelPause<B> {
    /// Not paused, nothing owed.
    pub(crate) const fn new() -> Self {
        Self {
            blocked: None,
            notice: None,
            since: None,
        }
    }

    /// Pauses the reader at `now` until `blocker` is lifted (replacing what it waited for).
    /// Returns whether the reader was running, in which case a pause notice is owed.
    pub(crate) fn block(&mut self, blocker: B, now: Instant) -> bool {
        let paused = self.blocked.is_none();
        if paused {
            self.notice = Some(Flow::Stop);
            self.since = Some(now);
        }
        self.blocked = Some(blocker);
        paused
    }

    /// What the paused reader waits for; `None` when it runs.
    pub(crate) const fn blocker(&self) -> Option<&B> {
        self.blocked.as_ref()
    }

    /// Lets the reader run again and owes a resume notice.
    pub(crate) fn resume(&mut self) {
        self.blocked = None;
        self.since = None;
        self.notice = Some(Flow::Resume);
    }

    /// Forgets the pause and any owed notice (the tunnel is gone).
    pub(crate) fn clear(&mut self) {
        self.blocked = None;
        self.since = None;
        self.notice = None;
    }

    /// When a pause that lasts `limit` is over its limit; `None` while the reader runs.
    pub(crate) fn limit_at(&self, limit: Duration) -> Option<Instant> {
        self.since.map(|since| since + limit)
    }

    /// The owed pause/resume notice, if any; clears it.
    pub(crate) fn take_notice(&mut self) -> Option<Flow> {
        self.notice.take()
    }
}
