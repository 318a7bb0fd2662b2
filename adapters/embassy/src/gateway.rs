//! State shared by the tunnel task and the stream workers: the relay behind a blocking mutex (held
//! only for synchronous calls, never across an `await`), one command channel per worker, and the
//! signals that wake tasks.

use core::cell::{Cell, RefCell};

use embassy_sync::blocking_mutex::Mutex;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::channel::Channel;
use embassy_sync::signal::Signal;
use heapless::String;
use tether_core::relay::{Config, Event, MAX_TCP_HOST, Relay};
use tether_core::stream_id::StreamId;
use tether_core::wire::UnixTime;

use crate::clock::unix_from_micros;
use crate::ws::MAX_CONTROL;

/// The message buffer of an embedded relay: `N` bytes inline.
pub type Buf<const N: usize> = heapless::Vec<u8, N>;

type Cs = CriticalSectionRawMutex;

/// A worker's orders. Data itself never travels in a channel: it stays in the relay's rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(crate) enum Cmd {
    /// Dial the target in the worker's slot.
    Dial,
    /// The relay has messages for the socket: pop and write them.
    Data,
    /// Close the socket (everything for it was popped).
    Close,
}

/// What a worker serves.
#[derive(Clone, Debug, Default)]
pub(crate) struct Assignment {
    pub(crate) stream: Option<StreamId>,
    pub(crate) host: String<MAX_TCP_HOST>,
    pub(crate) port: u16,
}

/// One stream worker's mailbox.
pub(crate) struct WorkerSlot {
    pub(crate) assignment: Mutex<Cs, RefCell<Assignment>>,
    pub(crate) cmds: Channel<Cs, Cmd, 8>,
    /// The relay can take the message the worker holds (after `ResumeReadingUpstream`).
    pub(crate) resume: Signal<Cs, ()>,
}

impl WorkerSlot {
    const fn new() -> Self {
        Self {
            assignment: Mutex::new(RefCell::new(Assignment {
                stream: None,
                host: String::new(),
                port: 0,
            })),
            cmds: Channel::new(),
            resume: Signal::new(),
        }
    }

    pub(crate) fn serves(&self, stream: &str) -> bool {
        self.assignment.lock(|a| {
            a.borrow()
                .stream
                .as_ref()
                .is_some_and(|s| s.as_str() == stream)
        })
    }
}

/// Everything the gateway's tasks share, for `STREAMS` streams whose rings hold `RING` messages of
/// up to `N` bytes each. Lives in a `static` (e.g. a `StaticCell`) and is handed to every task.
pub struct Gateway<const N: usize, const STREAMS: usize, const RING: usize> {
    relay: Mutex<Cs, RefCell<Relay<Buf<N>, STREAMS, RING>>>,
    pub(crate) workers: [WorkerSlot; STREAMS],
    /// Something may be owed to the tunnel or to a worker: the tunnel writer drains the relay.
    pub(crate) kick: Signal<Cs, ()>,
    /// The relay can take the tunnel message the reader holds.
    pub(crate) tunnel_resume: Signal<Cs, ()>,
    /// A ping's payload to echo in a pong.
    pong: Mutex<Cs, RefCell<Option<heapless::Vec<u8, MAX_CONTROL>>>>,
    /// `gateway_hello` was received: answer `gateway_hello_ack {use_yamux: false}`.
    hello_ack: Mutex<Cs, Cell<bool>>,
    /// Microseconds between the Unix epoch and `embassy_time`'s zero, once known.
    unix_offset: Mutex<Cs, Cell<Option<u64>>>,
}

impl<const N: usize, const STREAMS: usize, const RING: usize> Gateway<N, STREAMS, RING> {
    /// A gateway whose relay uses `config`. `config.max_message` bounds the tunnel messages the
    /// tunnel task's buffers must hold. `const`: a firmware puts the gateway in a plain `static`
    /// (its size is most of the RAM budget: it must not be built on the stack first).
    #[must_use]
    pub const fn new(config: Config) -> Self {
        Self {
            relay: Mutex::new(RefCell::new(Relay::new(config))),
            workers: [const { WorkerSlot::new() }; STREAMS],
            kick: Signal::new(),
            tunnel_resume: Signal::new(),
            pong: Mutex::new(RefCell::new(None)),
            hello_ack: Mutex::new(Cell::new(false)),
            unix_offset: Mutex::new(Cell::new(None)),
        }
    }

    /// Runs `f` on the relay. Synchronous only: nothing may await while the relay is borrowed.
    pub fn with_relay<T>(&self, f: impl FnOnce(&mut Relay<Buf<N>, STREAMS, RING>) -> T) -> T {
        self.relay.lock(|r| f(&mut r.borrow_mut()))
    }

    /// Sets the wall clock (a host with a real clock calls this at start).
    pub fn set_unix_time(&self, now: UnixTime) {
        let micros = now.secs.saturating_mul(1_000_000) + u64::from(now.nanos / 1_000);
        let uptime = embassy_time::Instant::now().as_micros();
        self.unix_offset
            .lock(|o| o.set(Some(micros.saturating_sub(uptime))));
    }

    /// Sets the wall clock if nothing set it yet (from a server's `Date`).
    pub(crate) fn learn_unix_time(&self, secs: u64) {
        if self.unix_offset.lock(Cell::get).is_none() {
            self.set_unix_time(UnixTime::new(secs, 0));
        }
    }

    /// The wall clock (the epoch itself until it is known).
    pub fn unix_now(&self) -> UnixTime {
        let offset = self.unix_offset.lock(Cell::get).unwrap_or(0);
        unix_from_micros(offset + embassy_time::Instant::now().as_micros())
    }

    /// Wakes the tunnel writer to drain the relay's outputs.
    pub fn kick(&self) {
        self.kick.signal(());
    }

    pub(crate) fn owe_pong(&self, payload: heapless::Vec<u8, MAX_CONTROL>) {
        self.pong.lock(|p| *p.borrow_mut() = Some(payload));
        self.kick();
    }

    pub(crate) fn take_pong(&self) -> Option<heapless::Vec<u8, MAX_CONTROL>> {
        self.pong.lock(|p| p.borrow_mut().take())
    }

    pub(crate) fn owe_hello_ack(&self) {
        self.hello_ack.lock(|h| h.set(true));
        self.kick();
    }

    pub(crate) fn take_hello_ack(&self) -> bool {
        self.hello_ack.lock(|h| h.replace(false))
    }

    /// The worker serving `stream`.
    pub(crate) fn worker_of(&self, stream: &str) -> Option<&WorkerSlot> {
        self.workers.iter().find(|w| w.serves(stream))
    }

    /// Hands `stream` to a free worker; `false` when every worker is busy.
    pub(crate) fn assign(&self, stream: &StreamId, host: &str, port: u16) -> bool {
        for w in &self.workers {
            let taken = w.assignment.lock(|a| {
                let mut a = a.borrow_mut();
                if a.stream.is_some() {
                    return false;
                }
                a.stream = Some(stream.clone());
                a.host.clear();
                let _ = a.host.push_str(host);
                a.port = port;
                true
            });
            if taken {
                while w.cmds.try_receive().is_ok() {}
                w.resume.reset();
                if w.cmds.try_send(Cmd::Dial).is_err() {
                    error!("worker mailbox full on dial");
                }
                return true;
            }
        }
        false
    }

    /// Acts on one relay event (called by the tunnel writer with the relay borrowed). Returns what
    /// the writer itself must do.
    pub(crate) fn dispatch(
        &self,
        relay: &mut Relay<Buf<N>, STREAMS, RING>,
        event: Event,
    ) -> WriterAction {
        match event {
            Event::Registered { cluster_id, .. } => {
                info!("registered as cluster {}", cluster_id.as_str());
                return WriterAction::Registered;
            }
            Event::SendPing => return WriterAction::Ping,
            Event::TunnelDead => return WriterAction::Dead,
            Event::PauseTunnelReads | Event::StopReadingUpstream(_) => {}
            Event::ResumeTunnelReads => self.tunnel_resume.signal(()),
            Event::DataForUpstream(id) => {
                if let Some(w) = self.worker_of(id.as_str())
                    && w.cmds.try_send(Cmd::Data).is_err()
                {
                    error!("stream {}: worker mailbox full", id);
                }
            }
            Event::CloseUpstream { stream, .. } => match self.worker_of(stream.as_str()) {
                Some(w) => {
                    if w.cmds.try_send(Cmd::Close).is_err() {
                        error!("stream {}: worker mailbox full on close", stream);
                    }
                }
                None => {
                    // No socket was ever opened for it (refused start): report it closed now.
                    let now = crate::now();
                    let _ = relay.handle_upstream_closed(now, stream.as_str(), 1000, "");
                }
            },
            Event::ResumeReadingUpstream(id) => {
                if let Some(w) = self.worker_of(id.as_str()) {
                    w.resume.signal(());
                }
            }
        }
        WriterAction::None
    }
}

/// What an event asks of the tunnel writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriterAction {
    None,
    Registered,
    Ping,
    Dead,
}
