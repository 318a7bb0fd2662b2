//! Tunnel liveness shared by the relay and the gateway: the ping and read-deadline timers and the
//! `SendPing` / `TunnelDead` events they owe the adapter.

use crate::time::{Duration, Instant};

/// Ping and read-deadline timers of one tunnel connection, with the events they owe.
#[derive(Debug, Default)]
pub(crate) struct Keepalive {
    /// `SendPing` is owed to the adapter.
    owe_ping: bool,
    next_ping: Option<Instant>,
    read_deadline: Option<Instant>,
    /// `TunnelDead` is owed to the adapter.
    owe_dead: bool,
}

impl Keepalive {
    /// No timers and nothing owed (same as `Default`, usable in `const` contexts).
    pub(crate) const IDLE: Self = Self {
        owe_ping: false,
        next_ping: None,
        read_deadline: None,
        owe_dead: false,
    };

    /// Timers armed for a tunnel connected at `now`.
    pub(crate) fn armed(now: Instant, ping_interval: Duration, read_deadline: Duration) -> Self {
        Self {
            next_ping: Some(now + ping_interval),
            read_deadline: Some(now + read_deadline),
            ..Self::IDLE
        }
    }

    /// The tunnel showed signs of life at `now` without a message from the peer (its reader is
    /// paused on purpose): pushes a running read deadline back; pings go on.
    pub(crate) fn activity(&mut self, now: Instant, read_deadline: Duration) {
        if self.read_deadline.is_some() {
            self.read_deadline = Some(now + read_deadline);
        }
    }

    /// Something arrived from the peer at `now`: pushes a running read deadline back and the next
    /// ping to `ping_interval` from now. Only a quiet peer is pinged, so a tunnel whose other end
    /// pings (or talks) more often carries no pings of this end's at all.
    pub(crate) fn heard(&mut self, now: Instant, read_deadline: Duration, ping_interval: Duration) {
        self.activity(now, read_deadline);
        if self.next_ping.is_some() {
            self.next_ping = Some(now + ping_interval);
        }
    }

    /// Fires the timers due at `now`: a due ping is owed and re-armed; a passed read deadline stops
    /// both timers and owes `TunnelDead`. Returns whether the read deadline passed.
    pub(crate) fn handle_timeout(&mut self, now: Instant, ping_interval: Duration) -> bool {
        if self.next_ping.is_some_and(|t| t <= now) {
            self.owe_ping = true;
            self.next_ping = Some(now + ping_interval);
        }
        if self.read_deadline.is_some_and(|t| t <= now) {
            self.read_deadline = None;
            self.next_ping = None;
            self.owe_dead = true;
            return true;
        }
        false
    }

    /// Stops both timers and drops an owed ping; an owed `TunnelDead` stays owed.
    pub(crate) fn stop(&mut self) {
        self.owe_ping = false;
        self.next_ping = None;
        self.read_deadline = None;
    }

    /// Earliest running timer.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        [self.next_ping, self.read_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether `TunnelDead` was owed; clears it.
    pub(crate) fn take_dead(&mut self) -> bool {
        core::mem::take(&mut self.owe_dead)
    }

    /// Whether `SendPing` was owed; clears it.
    pub(crate) fn take_ping(&mut self) -> bool {
        core::mem::take(&mut self.owe_ping)
    }
}
