//! Reading flow notices shared by the relay and the gateway.

use crate::keepalive::Keepalive;
use crate::relay::Close;
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

    /// The pause's part of a timer tick at `now`: a paused reader counts as tunnel activity (a
    /// tunnel we do not read is not silent). Returns whether the pause is past `limit`: close the
    /// stream it waits for with [`stall_close`].
    pub(crate) fn on_timeout(
        &self,
        now: Instant,
        limit: Duration,
        keepalive: &mut Keepalive,
        read_deadline: Duration,
    ) -> bool {
        if self.blocked.is_some() {
            keepalive.activity(now, read_deadline);
        }
        self.limit_at(limit).is_some_and(|t| t <= now)
    }

    /// The owed pause/resume notice, if any; clears it.
    pub(crate) fn take_notice(&mut self) -> Option<Flow> {
        self.notice.take()
    }
}

/// The close (1008, with the reason) for a stream whose `consumer` (`client`, `upstream`) took
/// nothing for `limit` while the paused tunnel waited for it.
pub(crate) fn stall_close(consumer: &str, limit: Duration) -> Close {
    let mut reason: heapless::String<{ crate::relay::MAX_CLOSE_REASON }> = heapless::String::new();
    let _ = core::fmt::write(
        &mut reason,
        format_args!(
            "stalled: the {consumer} took nothing for {} s (compat wire mode)",
            limit.as_millis() / 1000
        ),
    );
    Close::new(1008, reason.as_str())
}
