//! What both ends' tunnel drivers share: wake-ups gathered under the driver's lock and fired after
//! it is released, and the writer task that sends what the driver schedules.
//!
//! A driver (`agent::driver`, `control_plane::driver`) keeps a [`Wakeups`] inside its lock and a
//! [`Signals`] beside it: every call ends by taking the wake-ups and firing them unlocked, so no
//! task is ever woken while the lock is held.

use std::future::Future;
use std::task::Waker;

use futures_util::{Sink, SinkExt as _};
use tether_core::wire::UnixTime;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

/// The wall clock as the cores stamp envelopes with it.
pub(crate) fn unix_now() -> UnixTime {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UnixTime::new(since.as_secs(), since.subsec_nanos())
}

/// Wake-ups owed by the calls under a driver's lock, fired by [`Signals::fire`] after unlocking.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    /// Tasks waiting on a port.
    pub(crate) wakers: Vec<Waker>,
    /// The writer may find something to send.
    pub(crate) writer: bool,
    /// The task reading the tunnel should look at the driver again.
    pub(crate) control: bool,
}

/// The two notifies a driver's tasks wait on besides their ports' wakers.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    transmit: Notify,
    control: Notify,
}

impl Signals {
    /// Fires `wakeups` (call with the driver's lock released).
    pub(crate) fn fire(&self, wakeups: Wakeups) {
        for waker in wakeups.wakers {
            waker.wake();
        }
        if wakeups.writer {
            self.transmit.notify_one();
        }
        if wakeups.control {
            self.control.notify_one();
        }
    }

    /// Resolves once the writer may find something new to send.
    pub(crate) async fn transmit_wanted(&self) {
        self.transmit.notified().await;
    }

    /// Resolves once the task reading the tunnel should look at the driver again.
    pub(crate) async fn control_wanted(&self) {
        self.control.notified().await;
    }
}

/// What the writer task does next.
pub(crate) enum Next {
    /// Write this message.
    Send(WsMessage),
    /// Nothing owed: flush, then wait for [`Schedule::transmit_wanted`].
    Idle,
    /// The tunnel is over: close the sink and end.
    Finish,
}

/// A driver as its writer task sees it.
pub(crate) trait Schedule {
    /// The next message in the driver's order (see each driver's `next_out`).
    fn next_out(&self) -> Next;
    /// Writing the tunnel failed: the tunnel is over.
    fn writer_failed(&self, error: &WsError);
    /// Resolves once the writer may find something new to send.
    fn transmit_wanted(&self) -> impl Future<Output = ()> + Send;
}

/// Writes what `driver` schedules, one message at a time: the next is taken only once the socket
/// took the previous one, so the core's scheduler decides the order and nothing first-in-first-out
/// sits between it and the socket; flushes whenever nothing more is owed.
pub(crate) async fn write_loop<K, D>(mut sink: K, driver: &D)
where
    K: Sink<WsMessage, Error = WsError> + Unpin,
    D: Schedule,
{
    loop {
        match driver.next_out() {
            Next::Send(message) => {
                if let Err(e) = sink.feed(message).await {
                    driver.writer_failed(&e);
                    return;
                }
            }
            Next::Idle => {
                if let Err(e) = sink.flush().await {
                    driver.writer_failed(&e);
                    return;
                }
                driver.transmit_wanted().await;
            }
            Next::Finish => break,
        }
    }
    let _ = sink.close().await;
}

/// A driver's core as [`Locked`] drives it.
pub(crate) trait DriverCore {
    /// What every call gets beside the core (who the tunnel serves, shared state).
    type Ctx;
    /// Routes the core's events to the tasks they concern; ends every call.
    fn settle(&mut self, ctx: &Self::Ctx);
    /// The wake-ups owed by the current call.
    fn wakeups(&mut self) -> &mut Wakeups;
    /// The next message for the tunnel, in the core's order.
    fn next_out(&mut self, ctx: &Self::Ctx) -> Next;
    /// The writer waits for [`Signals::transmit_wanted`]: any later change must wake it.
    fn set_writer_idle(&mut self, idle: bool);
}

/// A driver's core behind its lock, with the notifies its tasks wait on.
///
/// Contract: the lock is never held across an `.await`; every call through [`Locked::with`] or
/// [`Locked::next_out`] ends in [`DriverCore::settle`], then fires its wake-ups unlocked.
pub(crate) struct Locked<C> {
    core: std::sync::Mutex<C>,
    signals: Signals,
}

impl<C: DriverCore> Locked<C> {
    pub(crate) fn new(core: C) -> Self {
        Self {
            core: std::sync::Mutex::new(core),
            signals: Signals::default(),
        }
    }

    /// The core, for a look that changes nothing the tasks wait on.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, C> {
        self.core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the core, settles it, then fires the wake-ups it caused (outside the lock).
    pub(crate) fn with<R>(&self, ctx: &C::Ctx, f: impl FnOnce(&mut C, &C::Ctx) -> R) -> R {
        let mut core = self.lock();
        let r = f(&mut core, ctx);
        core.settle(ctx);
        self.release(core);
        r
    }

    /// Drops the lock, then fires the wake-ups gathered under it.
    pub(crate) fn release(&self, mut core: std::sync::MutexGuard<'_, C>) {
        let wakeups = std::mem::take(core.wakeups());
        drop(core);
        self.signals.fire(wakeups);
    }

    /// The writer's turn: the next message, and the writer marked idle if there is none.
    pub(crate) fn next_out(&self, ctx: &C::Ctx) -> Next {
        let mut core = self.lock();
        core.set_writer_idle(false);
        let next = core.next_out(ctx);
        core.settle(ctx);
        // Marked after the settle: only a later change wakes the writer again.
        core.set_writer_idle(matches!(next, Next::Idle));
        self.release(core);
        next
    }

    pub(crate) fn signals(&self) -> &Signals {
        &self.signals
    }
}
