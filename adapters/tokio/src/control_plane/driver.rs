//! The one driver of a tunnel on the control-plane side: its [`Gateway`] behind a lock, driven by
//! three kinds of task that never queue bytes of their own.
//!
//! * The tunnel task ([`super::tunnel::run`]) reads the agent's tunnel into the gateway and fires
//!   its timers.
//! * The writer task takes the next message from the gateway only once the socket took the
//!   previous one ([`Driver::next_out`]), so the gateway's scheduler (interactive first) decides
//!   what goes next and nothing first-in-first-out sits between it and the socket.
//! * Every client task (a kubectl WebSocket, a response body, a forwarded socket) works through
//!   its own [`Port`]: it pops its stream's data straight from the gateway's ring and hands its
//!   client's messages straight to it; a full ring keeps the message in the task's hands until the
//!   gateway's [`Event::ResumeReadingClient`], so a stalled stream holds only itself.
//!
//! Contracts:
//! * The lock is never held across an `.await`; wakers and notifies fire after it is released.
//! * Every call that changes the gateway ends in [`Core::settle`]: the gateway's events are
//!   drained and routed to the one task each concerns (its port's `recv` or `send` waker, the
//!   writer, the tunnel task), and the process metrics catch up.
//! * Per stream, a port yields: at most one start notice (started, failed, response head), then
//!   the stream's data in order, then exactly one terminal notice, after which it yields `None`.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tether_core::gateway::{
    Config, Event, Gateway, Handled, HttpRequest, OpenError, Stats, StreamRequest, TcpOpen,
    TunnelError,
};
use tether_core::relay::{Close, Message, SendError, Transmit, TransmitError};
use tether_core::time::Instant as CoreInstant;
use tether_core::wire::UnixTime;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use super::State;
use super::link::{OpenRequest, OpenStream, OpenTcp, ToClient};
use crate::agent::metrics::RingSampler;
use crate::buf::Buf;
use crate::tunnel_driver::{DriverCore, Locked, Next, Schedule, Wakeups, unix_now};

/// Streams and requests one tunnel carries at once. The gateway's table and rings live on the heap
/// and grow with use (tether-core's `alloc` feature), so the capacity costs nothing until used.
pub(crate) const MAX_STREAMS: usize = 16_384;

/// The gateway of one tunnel.
pub(crate) type Gw = Gateway<Buf, MAX_STREAMS>;

/// Starting size of a tunnel's encode and scratch buffers.
const IDLE_BUFFER: usize = 4 * 1024;

/// Response headers never passed to the client: hop-by-hop, and framing the control plane redoes.
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why a stream was not opened: the HTTP status and message its client gets.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) message: String,
}

impl Refused {
    fn gone(cluster: &str) -> Self {
        Self {
            status: 502,
            message: format!("the agent of cluster \"{cluster}\" went away"),
        }
    }

    fn from_open(e: &OpenError) -> Self {
        let status = match e {
            OpenError::NotRegistered => 502,
            OpenError::TooManyStreams => 503,
            OpenError::Request(_) | OpenError::Method | OpenError::TcpTarget => 400,
            OpenError::UpgradeUnsupported => 501,
            OpenError::TooLarge { .. } | OpenError::PayloadRefused { .. } => 413,
            OpenError::DuplicateStream | OpenError::StreamId(_) | OpenError::Encode(_) => 500,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

/// What the tunnel task reads off the driver before it waits.
pub(crate) struct Turn {
    /// The tunnel is over.
    pub(crate) dead: bool,
    /// Reading the tunnel is paused (compat head-of-line blocking).
    pub(crate) paused: bool,
    /// A refused tunnel message waits to be handed in again.
    pub(crate) parked: bool,
    /// The agent just registered: put the tunnel in the table (once).
    pub(crate) registered_now: bool,
    /// When the gateway's next timer fires.
    pub(crate) deadline: Option<tokio::time::Instant>,
}

/// One stream's place in the driver: notices its task has not taken yet, and who waits.
#[derive(Debug, Default)]
struct PortState {
    /// Start notices (taken before any data) and the terminal notice (taken after all of it).
    notices: VecDeque<ToClient>,
    /// The task waiting for data or a notice.
    recv: Option<Waker>,
    /// The task waiting for room toward the agent.
    send: Option<Waker>,
}

/// Who the tunnel serves, for logs, the tunnel table and the metrics.
pub(crate) struct Ctx {
    cluster: String,
    generation: u64,
    state: Arc<State>,
}

/// Everything behind the driver's lock.
pub(crate) struct Core {
    gw: Box<Gw>,
    ports: HashMap<String, PortState>,
    /// A tunnel message the gateway refused as `Blocked`, to hand in again on resume.
    pending_in: Option<WsMessage>,
    paused: bool,
    registered: bool,
    registered_now: bool,
    dead: bool,
    lost: bool,
    /// The metrics were settled for the last time (the tunnel task ended).
    finished: bool,
    owe_ping: bool,
    owe_close: Option<CloseFrame>,
    /// The writer waits for [`Driver::transmit_wanted`].
    writer_idle: bool,
    /// Wake-ups owed by the current call, fired once the lock is released.
    wake: Wakeups,
    base: tokio::time::Instant,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// Streams of this tunnel counted in the `streams_active` gauge.
    counted_streams: i64,
    last_stats: Stats,
    /// `(registered, paused)` as last given to `observe_tunnel`.
    observed: Option<(bool, bool)>,
    rings: RingSampler,
}

/// One tunnel's gateway and the tasks that drive it. See the module docs.
pub(crate) struct Driver {
    locked: Locked<Core>,
    ctx: Ctx,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("cluster", &self.ctx.cluster)
            .field("generation", &self.ctx.generation)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// The driver of a new tunnel of `cluster`, offering the native wire mode per the control
    /// plane's `--wire-mode`.
    pub(crate) fn new(cluster: String, generation: u64, state: Arc<State>) -> Arc<Self> {
        let defaults = Config::default();
        let config = Config {
            extensions: state.wire_mode.apply(defaults.extensions),
            ..defaults
        };
        let core = Core {
            gw: Box::new(Gw::new(config, &cluster, CoreInstant::ZERO)),
            ports: HashMap::new(),
            pending_in: None,
            paused: false,
            registered: false,
            registered_now: false,
            dead: false,
            lost: false,
            finished: false,
            owe_ping: false,
            owe_close: None,
            writer_idle: false,
            wake: Wakeups::default(),
            base: tokio::time::Instant::now(),
            // Both grow to what a message needs (`BufferTooSmall` / `ScratchTooSmall`): an idle
            // tunnel, the common case in a fleet, keeps them small.
            buf: vec![0; IDLE_BUFFER],
            scratch: vec![0; IDLE_BUFFER],
            counted_streams: 0,
            last_stats: Stats::default(),
            observed: None,
            rings: RingSampler::default(),
        };
        Arc::new(Self {
            locked: Locked::new(core),
            ctx: Ctx {
                cluster,
                generation,
                state,
            },
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.locked.lock()
    }

    /// Runs `f` on the core, settles it, then fires the wake-ups it caused (outside the lock).
    fn with<R>(&self, f: impl FnOnce(&mut Core, &Ctx) -> R) -> R {
        self.locked.with(&self.ctx, f)
    }

    /// Resolves once the tunnel task should look at [`Driver::turn`] again.
    pub(crate) async fn control_wanted(&self) {
        self.locked.signals().control_wanted().await;
    }

    // ---------------------------------------------------------------------------------------------
    // The tunnel task

    /// The state the tunnel task waits on. Clears the one-shot "registered now".
    pub(crate) fn turn(&self) -> Turn {
        let mut core = self.lock();
        let deadline = core
            .gw
            .poll_timeout()
            .map(|at| core.base + Duration::from_micros(at.as_micros()));
        Turn {
            dead: core.dead,
            paused: core.paused,
            parked: core.pending_in.is_some(),
            registered_now: std::mem::take(&mut core.registered_now),
            deadline,
        }
    }

    /// Hands in one item read from the agent's tunnel (`None`: the connection ended). Returns
    /// whether the tunnel task may read on (not paused, nothing parked, not dead).
    pub(crate) fn on_message(&self, message: Option<Result<WsMessage, WsError>>) -> bool {
        self.with(|core, ctx| {
            core.on_message(ctx, message);
            !core.paused && core.pending_in.is_none() && !core.dead
        })
    }

    /// Reads resumed: hands the parked message in again (it may park again).
    pub(crate) fn on_resume(&self) {
        self.with(|core, ctx| {
            if let Some(message) = core.pending_in.take() {
                core.on_message(ctx, Some(Ok(message)));
            }
        });
    }

    /// A timer came due.
    pub(crate) fn on_timeout(&self) {
        self.with(|core, _| {
            let now = core.now();
            core.gw.handle_timeout(now);
        });
    }

    /// The tunnel connection is gone: every stream ends with `reason`. Data already queued for a
    /// client stays poppable through its port; its terminal notice follows it.
    pub(crate) fn lose(&self, reason: &str) {
        self.with(|core, _| core.lose(reason));
    }

    /// Ends the tunnel now with `reason`: every stream ends, and the agent gets a close frame.
    pub(crate) fn end(&self, reason: &'static str) {
        self.with(|core, _| {
            core.lose(reason);
            core.owe_close = Some(CloseFrame {
                code: CloseCode::Away,
                reason: reason.into(),
            });
            core.dead = true;
            core.wake.writer = true;
        });
    }

    /// The last settle: the metrics catch up once more and this tunnel's streams leave the
    /// `streams_active` gauge. Nothing is observed after it.
    pub(crate) fn finish(&self) {
        let mut core = self.lock();
        core.drive_metrics(&self.ctx);
        core.finished = true;
        self.ctx
            .state
            .metrics
            .streams_active
            .fetch_sub(core.counted_streams, Ordering::Relaxed);
        core.counted_streams = 0;
        core.dead = true;
        drop(core);
        self.locked.signals().fire(Wakeups {
            writer: true,
            ..Wakeups::default()
        });
    }

    /// Whether the agent registered on this tunnel.
    pub(crate) fn registered(&self) -> bool {
        self.lock().registered
    }

    // ---------------------------------------------------------------------------------------------
    // Client tasks

    /// Opens a WebSocket stream or a raw upgrade (on an agent that cannot carry raw upgrades: a
    /// plain request, answered with [`ToClient::Head`]).
    pub(crate) fn open_stream(self: &Arc<Self>, open: OpenStream) -> Result<Port, Refused> {
        if let Some((method, _)) = &open.upgrade
            && !self.lock().gw.extensions().raw_upgrade
        {
            // A PipeOps agent cannot carry the upgrade: what it can do is a plain request.
            tracing::info!(cluster = %self.ctx.cluster, stream = %open.id, "agent cannot carry raw upgrades: sent as a plain request");
            let request = OpenRequest {
                id: open.id,
                method: method.clone(),
                path: open.path,
                query: open.query,
                headers: open.headers,
                user: open.user,
                groups: open.groups,
                body: bytes::Bytes::new(),
            };
            return self.open_request(request);
        }
        let headers = borrowed(&open.headers);
        let groups: Vec<&str> = open.groups.iter().map(String::as_str).collect();
        let req = StreamRequest {
            id: &open.id,
            path: &open.path,
            query: &open.query,
            headers: &headers.as_slice(),
            protocols: &open.protocols,
            upgrade: open.upgrade.as_ref().map(|(m, t)| (m.as_str(), t.as_str())),
            user: Some(&open.user),
            groups: &groups,
        };
        self.with(|core, ctx| {
            core.open(ctx, &open.id, |gw, now, unix, scratch| {
                gw.open_stream(now, unix, &req, scratch)
            })
        })
        .inspect_err(|e| tracing::warn!(cluster = %self.ctx.cluster, stream = %open.id, error = %e.message, "stream refused"))?;
        tracing::info!(cluster = %self.ctx.cluster, stream = %open.id, user = %open.user, path = %open.path, "stream opened");
        Ok(self.port(open.id))
    }

    /// Forwards an HTTP request whose body is `open.body`.
    pub(crate) fn open_request(self: &Arc<Self>, open: OpenRequest) -> Result<Port, Refused> {
        let headers = borrowed(&open.headers);
        let groups: Vec<&str> = open.groups.iter().map(String::as_str).collect();
        let req = HttpRequest {
            id: &open.id,
            method: &open.method,
            path: &open.path,
            query: &open.query,
            headers: &headers.as_slice(),
            user: Some(&open.user),
            groups: &groups,
            body: &open.body,
        };
        self.with(|core, ctx| {
            let needed = core.gw.max_transmit_len().min(
                tether_core::wire::b64::encoded_len(open.body.len()).saturating_add(64 * 1024),
            );
            if core.scratch.len() < needed {
                core.scratch.resize(needed, 0);
            }
            core.open(ctx, &open.id, |gw, now, unix, scratch| {
                gw.open_request(now, unix, &req, scratch)
            })
        })
        .inspect_err(|e| tracing::warn!(cluster = %self.ctx.cluster, request = %open.id, error = %e.message, "request refused"))?;
        tracing::debug!(cluster = %self.ctx.cluster, request = %open.id, user = %open.user, method = %open.method, path = %open.path, "request forwarded");
        Ok(self.port(open.id))
    }

    /// Opens a TCP tunnel; also returns the most bytes one message of it should carry.
    pub(crate) fn open_tcp(self: &Arc<Self>, open: OpenTcp) -> Result<(Port, usize), Refused> {
        let req = TcpOpen {
            id: &open.id,
            host: &open.host,
            port: open.port,
            client_addr: Some(&open.client_addr),
        };
        let piece = self
            .with(|core, ctx| {
                core.open(ctx, &open.id, |gw, now, unix, scratch| {
                    gw.open_tcp(now, unix, &req, scratch)
                })
                .map(|()| core.gw.tcp_piece_len())
            })
            .inspect_err(|e| tracing::warn!(cluster = %self.ctx.cluster, tunnel = %open.id, error = %e.message, "tcp forward refused"))?;
        tracing::info!(cluster = %self.ctx.cluster, tunnel = %open.id, client = %open.client_addr, target = %format!("{}:{}", open.host, open.port), "tcp forward opened");
        Ok((self.port(open.id), piece))
    }

    fn port(self: &Arc<Self>, id: String) -> Port {
        Port {
            driver: self.clone(),
            id: id.into(),
        }
    }
}

impl Schedule for Driver {
    /// The next message for the tunnel socket, in the gateway's order: a close frame, a ping, then
    /// what the scheduler picks.
    fn next_out(&self) -> Next {
        self.locked.next_out(&self.ctx)
    }

    fn writer_failed(&self, _: &WsError) {
        self.with(|core, _| {
            core.dead = true;
            core.wake.control = true;
        });
    }

    fn transmit_wanted(&self) -> impl Future<Output = ()> + Send {
        self.locked.signals().transmit_wanted()
    }
}

impl DriverCore for Core {
    type Ctx = Ctx;

    fn settle(&mut self, ctx: &Ctx) {
        Self::settle(self, ctx);
    }

    fn wakeups(&mut self) -> &mut Wakeups {
        &mut self.wake
    }

    fn next_out(&mut self, ctx: &Ctx) -> Next {
        Self::next_out(self, ctx)
    }

    fn set_writer_idle(&mut self, idle: bool) {
        self.writer_idle = idle;
    }
}

impl Core {
    fn now(&self) -> CoreInstant {
        CoreInstant::from_micros(u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// Runs one of the gateway's opens for stream `id` on a live tunnel (with `now`, the unix
    /// time and the scratch buffer) and gives an opened stream its port.
    fn open(
        &mut self,
        ctx: &Ctx,
        id: &str,
        open: impl FnOnce(&mut Gw, CoreInstant, UnixTime, &mut [u8]) -> Result<(), OpenError>,
    ) -> Result<(), Refused> {
        if self.dead || self.lost {
            return Err(Refused::gone(&ctx.cluster));
        }
        let now = self.now();
        open(&mut self.gw, now, unix_now(), &mut self.scratch)
            .map_err(|e| Refused::from_open(&e))?;
        self.ports.insert(id.to_string(), PortState::default());
        self.wake.writer = true;
        Ok(())
    }

    /// Drains the gateway's events, routing each to the task it concerns, and catches the metrics
    /// up. Called at the end of every [`Driver::with`].
    fn settle(&mut self, ctx: &Ctx) {
        while let Some(event) = self.gw.poll_event() {
            self.on_event(ctx, event);
        }
        if self.writer_idle {
            // Whatever changed may have made a message due; the writer finds out.
            self.writer_idle = false;
            self.wake.writer = true;
        }
        if !self.finished {
            self.drive_metrics(ctx);
        }
    }

    /// Queues `item` (if any) for the port of `id` and wakes its reader; a terminal item also
    /// wakes a sender waiting for room (its stream takes nothing more).
    fn notify_port(&mut self, id: &str, item: Option<ToClient>) {
        if let Some(port) = self.ports.get_mut(id) {
            if let Some(item) = item {
                if !item.is_start()
                    && let Some(waker) = port.send.take()
                {
                    self.wake.wakers.push(waker);
                }
                port.notices.push_back(item);
            }
            if let Some(waker) = port.recv.take() {
                self.wake.wakers.push(waker);
            }
        }
    }

    fn on_event(&mut self, ctx: &Ctx, event: Event) {
        match event {
            Event::Registered {
                agent_id,
                extensions,
            } => {
                tracing::info!(
                    cluster = %ctx.cluster,
                    agent_id = %agent_id,
                    wire = if extensions.native { "native" } else { "compat" },
                    ?extensions,
                    "agent registered"
                );
                if !self.registered {
                    self.registered = true;
                    self.registered_now = true;
                    self.wake.control = true;
                }
            }
            Event::AgentDraining => {
                tracing::info!(
                    cluster = %ctx.cluster,
                    "agent draining: new streams go to the cluster's other tunnels"
                );
                ctx.state.tunnels.set_draining(&ctx.cluster, ctx.generation);
            }
            Event::SendPing => {
                self.owe_ping = true;
                self.wake.writer = true;
            }
            Event::TunnelDead => {
                tracing::warn!(cluster = %ctx.cluster, "agent tunnel silent past the read deadline");
                ctx.state.metrics.tunnel_failed();
                self.dead = true;
                self.wake.control = true;
            }
            Event::PauseTunnelReads => self.paused = true,
            Event::ResumeTunnelReads => {
                self.paused = false;
                self.wake.control = true;
            }
            Event::Started {
                stream,
                subprotocol,
            } => self.notify_port(
                stream.as_str(),
                Some(ToClient::Started {
                    subprotocol: subprotocol.as_str().to_string(),
                }),
            ),
            Event::Failed {
                stream,
                status,
                message,
            } => self.notify_port(
                stream.as_str(),
                Some(ToClient::Failed {
                    status,
                    message: message.as_str().to_string(),
                }),
            ),
            Event::DataForClient(stream) => self.notify_port(stream.as_str(), None),
            Event::Closed { stream, close } => {
                self.notify_port(stream.as_str(), Some(ToClient::Closed(close)));
            }
            Event::ResponseEnd(stream) => self.notify_port(stream.as_str(), Some(ToClient::End)),
            Event::ResponseAbort { stream, message } => self.notify_port(
                stream.as_str(),
                Some(ToClient::Abort(message.as_str().to_string())),
            ),
            // The port finds out itself: its message comes back `Full` and it waits for resume.
            Event::StopReadingClient(_) => {}
            Event::ResumeReadingClient(stream) => {
                if let Some(waker) = self
                    .ports
                    .get_mut(stream.as_str())
                    .and_then(|p| p.send.take())
                {
                    self.wake.wakers.push(waker);
                }
            }
        }
    }

    fn on_message(&mut self, ctx: &Ctx, message: Option<Result<WsMessage, WsError>>) {
        match message {
            Some(Ok(WsMessage::Text(text))) => self.handle_frame(ctx, WsMessage::Text(text)),
            Some(Ok(WsMessage::Binary(bytes)))
                if self.gw.is_native() && tether_core::wire::native::is_data(&bytes) =>
            {
                let now = self.now();
                match self.gw.handle_native_data(now, Buf(bytes.clone())) {
                    Ok(()) => {}
                    // Only when the reply queue is full: the usual path parks it and pauses.
                    Err(TunnelError::Blocked) => self.handle_frame(ctx, WsMessage::Binary(bytes)),
                    Err(e) => ctx.state.metrics.tunnel_error(&e),
                }
            }
            Some(Ok(message @ WsMessage::Binary(_))) => self.handle_frame(ctx, message),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {
                let now = self.now();
                self.gw.handle_tunnel_activity(now);
            }
            Some(Ok(WsMessage::Close(frame))) => {
                tracing::info!(cluster = %ctx.cluster, ?frame, "agent closed the tunnel");
                self.dead = true;
            }
            Some(Ok(WsMessage::Frame(_))) => {}
            Some(Err(e)) => {
                tracing::warn!(cluster = %ctx.cluster, error = %e, "agent tunnel failed");
                ctx.state.metrics.tunnel_failed();
                self.dead = true;
            }
            None => self.dead = true,
        }
    }

    /// Hands one text or binary tunnel message to the gateway; a `Blocked` one is parked.
    fn handle_frame(&mut self, ctx: &Ctx, message: WsMessage) {
        let now = self.now();
        let bytes: &[u8] = match &message {
            WsMessage::Text(text) => text.as_bytes(),
            WsMessage::Binary(bytes) => bytes,
            _ => return,
        };
        loop {
            match self.gw.handle_tunnel_message(now, bytes, &mut self.scratch) {
                Ok(Handled::Consumed) => {}
                Ok(Handled::ResponseHead(head)) => {
                    let headers = response_headers(&head);
                    let item = ToClient::Head {
                        status: head.status,
                        headers,
                        gzip: head.gzip,
                    };
                    let id = head.stream.as_str().to_string();
                    self.notify_port(&id, Some(item));
                }
                Ok(Handled::Other(env, _)) => {
                    tracing::debug!(cluster = %ctx.cluster, kind = %env.type_name, "agent message ignored");
                }
                Err(TunnelError::Blocked) => {
                    self.pending_in = Some(message);
                    self.paused = true;
                }
                Err(TunnelError::ScratchTooSmall { needed }) => {
                    self.scratch.resize(needed, 0);
                    continue;
                }
                // Logged and answered by the gateway; nothing else changed.
                Err(e) => ctx.state.metrics.tunnel_error(&e),
            }
            return;
        }
    }

    fn next_out(&mut self, ctx: &Ctx) -> Next {
        if let Some(frame) = self.owe_close.take() {
            return Next::Send(WsMessage::Close(Some(frame)));
        }
        if self.dead {
            return Next::Finish;
        }
        if std::mem::take(&mut self.owe_ping) {
            return Next::Send(WsMessage::Ping(Default::default()));
        }
        loop {
            let now = self.now();
            return match self.gw.poll_transmit_owned(now, unix_now(), &mut self.buf) {
                Ok(Some(Transmit::Data { header, payload })) => {
                    Next::Send(WsMessage::Binary(Buf::frame(&header, &payload)))
                }
                Ok(Some(Transmit::Encoded(n))) => {
                    let bytes = &self.buf[..n];
                    let text = (!tether_core::wire::native::is_native(bytes))
                        .then(|| std::str::from_utf8(bytes).ok())
                        .flatten();
                    Next::Send(match text {
                        Some(text) => WsMessage::text(text),
                        None => WsMessage::binary(bytes.to_vec()),
                    })
                }
                Ok(None) => Next::Idle,
                Err(TransmitError::BufferTooSmall { needed }) => {
                    self.buf.resize(needed, 0);
                    continue;
                }
                Err(e) => {
                    tracing::error!(cluster = %ctx.cluster, error = %e, "cannot encode a tunnel message");
                    self.dead = true;
                    self.wake.control = true;
                    Next::Finish
                }
            };
        }
    }

    /// Ends every stream with `reason` (once). Each port still takes its queued data, then its
    /// terminal notice.
    fn lose(&mut self, reason: &str) {
        if !self.lost {
            self.lost = true;
            let now = self.now();
            self.gw.handle_tunnel_lost(now, reason);
            // Nothing more goes toward the agent: no sender waits for room.
            let senders = self.ports.values_mut().filter_map(|p| p.send.take());
            self.wake.wakers.extend(senders);
        }
    }

    /// Adds this tunnel's counter growth to the process metrics.
    fn drive_metrics(&mut self, ctx: &Ctx) {
        let stats = self.gw.stats();
        let m = &ctx.state.metrics;
        m.add(&self.last_stats, &stats);
        self.last_stats = stats;
        let count = i64::try_from(self.gw.stream_count()).unwrap_or(i64::MAX);
        m.streams_active
            .fetch_add(count - self.counted_streams, Ordering::Relaxed);
        self.counted_streams = count;
        // The tunnel's view sits behind process-wide locks: taken only when it changed or the
        // ring gauges are due, not on every message of every stream.
        let rings = self.rings.due();
        let view = (self.registered, self.paused);
        if rings || self.observed != Some(view) {
            self.observed = Some(view);
            m.observe_tunnel(
                ctx.generation,
                &ctx.cluster,
                self.registered,
                self.paused,
                &self.gw,
                rings,
            );
        }
    }
}

/// The response head's headers a client may get: hop-by-hop and framing headers dropped, and
/// names or values that are not valid HTTP dropped with a log line.
fn response_headers(
    head: &tether_core::gateway::ResponseHead<'_>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    for (name, values) in head.headers.iter() {
        let name = name.to_string();
        if DROPPED_RESPONSE_HEADERS
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&name))
        {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            tracing::warn!(stream = %head.stream, "invalid response header name dropped");
            continue;
        };
        for value in values {
            match HeaderValue::from_str(&value.to_string()) {
                Ok(value) => headers.push((name.clone(), value)),
                Err(_) => tracing::warn!(
                    stream = %head.stream,
                    header = %name,
                    "invalid response header value dropped"
                ),
            }
        }
    }
    headers
}

/// `headers` as the gateway's requests take them.
fn borrowed(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
    headers
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect()
}

/// A client task's handle on its stream. Both directions may be driven from one task at once
/// (`recv` and `send` wait on separate wakers).
#[derive(Debug)]
pub(crate) struct Port {
    driver: Arc<Driver>,
    id: Arc<str>,
}

impl Port {
    /// The stream's id (for logs).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The next item for the client: start notices, then data in order, then the terminal
    /// notice; `None` once that was taken (or the stream is gone).
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<ToClient>> {
        self.driver.with(|core, _| {
            let Some(port) = core.ports.get_mut(&*self.id) else {
                return Poll::Ready(None);
            };
            if port.notices.front().is_some_and(ToClient::is_start) {
                let item = port.notices.pop_front();
                if matches!(item, Some(ToClient::Failed { .. })) {
                    core.ports.remove(&*self.id);
                }
                return Poll::Ready(item);
            }
            if let Some(message) = core.gw.pop_client(&self.id) {
                return Poll::Ready(Some(ToClient::Data(message)));
            }
            let Some(port) = core.ports.get_mut(&*self.id) else {
                return Poll::Ready(None);
            };
            if let Some(item) = port.notices.pop_front() {
                core.ports.remove(&*self.id);
                return Poll::Ready(Some(item));
            }
            port.recv = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// [`poll_recv`](Self::poll_recv) as a future.
    pub(crate) async fn recv(&self) -> Option<ToClient> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Hands one client message to the gateway, waiting while the stream's ring toward the agent
    /// is full. A message over the tunnel's limit closes the stream with 1009 (the client gets the
    /// close through [`recv`](Self::recv)); on a stream whose agent side ended it is dropped.
    pub(crate) async fn send(&self, message: Message<Buf>) {
        let mut message = Some(message);
        poll_fn(|cx| {
            self.driver.with(|core, _| {
                let Some(Message { kind, payload }) = message.take() else {
                    return Poll::Ready(());
                };
                let now = core.now();
                match core.gw.handle_client_message(now, &self.id, kind, payload) {
                    Ok(()) | Err(SendError::Closed(_)) => Poll::Ready(()),
                    Err(SendError::Full(payload)) => {
                        message = Some(Message { kind, payload });
                        if let Some(port) = core.ports.get_mut(&*self.id) {
                            port.send = Some(cx.waker().clone());
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    }
                    Err(SendError::TooLarge(_)) => {
                        tracing::warn!(stream = %self.id, "client message larger than the tunnel limit; closing");
                        let close = Close::new(1009, "message too big");
                        let _ = core.gw.handle_client_closed(now, &self.id, Some(close.clone()));
                        core.notify_port(&self.id, Some(ToClient::Closed(close)));
                        Poll::Ready(())
                    }
                }
            })
        })
        .await;
    }

    /// The client closed (with its close frame) or went away (`None`): the stream ends (the agent
    /// gets what was queued for it, then the close). Idempotent.
    pub(crate) fn close(&self, close: Option<Close>) {
        self.driver.with(|core, _| {
            core.ports.remove(&*self.id);
            let now = core.now();
            let _ = core.gw.handle_client_closed(now, &self.id, close);
        });
    }
}

/// Closes its port when dropped, so a client task that ends in any way (error, panic, client
/// gone, finished) frees its stream. Harmless for a stream that already ended.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    pub(crate) port: Port,
    /// The close the agent gets (`None`: "client went away").
    pub(crate) close: Option<Close>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.port.close(self.close.take());
    }
}
