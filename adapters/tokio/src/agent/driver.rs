//! The one driver of the agent's tunnel: its relay and request table behind a lock, driven by
//! tasks that never queue bytes of their own.
//!
//! * The session task ([`super::session::run`]) reads the tunnel into the cores, fires their
//!   timers, and hands the request tasks' reports in.
//! * The writer task takes the next message only once the socket took the previous one
//!   ([`Driver::next_out`]), so the relay's scheduler (interactive first) decides what goes next.
//! * Every stream task (a WebSocket, a raw upgrade, a TCP tunnel) works through its own [`Port`]:
//!   it pops its stream's data straight from the relay's ring toward the upstream and hands what
//!   its upstream sent straight to the relay; a full ring keeps the message in the task's hands
//!   until the relay's `ResumeReadingUpstream`, so a stalled stream holds only itself.
//!
//! Contracts:
//! * The lock is never held across an `.await`; wakers and notifies fire after it is released.
//! * Every call that changes a core ends in [`Core::settle`]: the relay's and the request table's
//!   events are drained and routed to the one task each concerns, and the metrics catch up.
//! * A stream task learns everything through its port, in order: its data, then one close; a port
//!   whose stream is gone yields `None`.
//! * The driver outlives sessions (the cores keep their configuration and counters); a port
//!   belongs to one session, and a task left from an earlier one is only told to close.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tether_core::relay::{
    Event, Handled, MessageKind, SendError, SessionInfo, Transmit, TunnelError,
};
use tether_core::request::{Cancelled, RequestError, RequestEvent};
use tether_core::wire::{Inbound, JsonStr, Outbound};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tracing::{debug, info, warn};

use super::exchanges::HttpHandle;
use super::http::{AbortOnDrop, FromHttp};
use super::metrics::{RingSampler, StreamKind, StreamLife};
use super::upstream::{self, StreamSpec, ToUpstream};
use super::{AgentRelay, AgentRequests, Shared};
use crate::buf::Buf;
use crate::kube::headers;
use crate::tunnel_driver::{DriverCore, Locked, Next, Schedule, Wakeups, unix_now};

/// What a stream or request that arrives while the agent drains is told (HTTP 503).
pub(crate) const DRAINING: &str =
    "the agent is shutting down; retry to reach another agent of the cluster";
/// Why live streams end when the shutdown grace period runs out (close 1001).
pub(crate) const GRACE_OVER: &str = "agent shutting down: grace period over";
/// Response bytes encoded for the tunnel but not yet taken by the writer beyond which the session
/// stops taking the request tasks' reports (they then wait in their 64-slot channel and the tasks
/// stop reading their responses).
const OUTBOX_LIMIT: usize = 1 << 20;

/// What the session task reads off the driver before it waits.
pub(crate) struct Turn {
    /// The session is over, for this reason.
    pub(crate) dead: Option<String>,
    /// The tunnel may be read (the cores take input).
    pub(crate) reading: bool,
    /// The request tasks' reports may be taken (the writer keeps up).
    pub(crate) reports: bool,
    /// Nothing live: no stream, no request, nothing owed to the control plane.
    pub(crate) idle: bool,
    /// When the cores' next timer fires.
    pub(crate) deadline: Option<tokio::time::Instant>,
    /// Resolves once the request body channel that paused reading has room.
    pub(crate) body_wait: Option<BodyWait>,
    /// When that request is failed alone if its body channel still has no room.
    pub(crate) body_deadline: Option<tokio::time::Instant>,
}

/// Why tunnel reading is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    /// The relay refused a message as blocked: wait for `ResumeTunnelReads`.
    Relay,
    /// The request table's reply queue was full: retry once the writer took a reply.
    Requests,
    /// A request body channel is full: wait for room.
    Body,
}

pub(crate) type BodyWait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One stream task's place in the driver.
struct StreamEntry {
    /// Aborts a dial nobody waits for any more; detached once the upstream answered.
    task: Option<AbortOnDrop>,
    /// The upstream answered 101 (or the TCP target accepted).
    open: bool,
    /// Started by a `proxy_request` upgrade: report the outcome to the request table too.
    upgrade: bool,
    /// The relay is done with the stream (grace over, or an earlier session): the task is only
    /// told to close its upstream, and what it reads is dropped.
    settled: bool,
    /// The close to give the task once the relay's data for it is out.
    close: Option<(u16, String)>,
    /// The close was given.
    close_given: bool,
    /// The task waiting for data or its close.
    recv: Option<Waker>,
    /// The task waiting for room toward the tunnel.
    send: Option<Waker>,
    _life: StreamLife,
}

/// How the session ends, once asked to.
enum Ending {
    /// Write what is owed, then this close frame, then finish.
    Close(CloseFrame),
    /// Finish now.
    Now,
}

/// Everything behind the driver's lock.
pub(crate) struct Core {
    pub(super) relay: Box<AgentRelay>,
    pub(super) requests: Box<AgentRequests>,
    pub(super) scratch: Vec<u8>,
    pub(super) txbuf: Vec<u8>,
    /// The driver this core is in, for the ports of new streams.
    me: Weak<Driver>,
    /// Counts sessions, moved on when one ends; a port carries the one it was made in.
    session: u64,
    streams: HashMap<String, StreamEntry>,
    /// Stream tasks of earlier sessions still closing their upstream.
    orphans: Vec<(u64, Arc<str>, StreamEntry)>,
    pub(super) http: HashMap<String, HttpHandle>,
    /// Where this session's request tasks report.
    pub(super) reports: Option<mpsc::Sender<FromHttp>>,
    pending: Option<Vec<u8>>,
    pub(super) pause: Option<Pause>,
    body_wait: Option<BodyWait>,
    /// The request whose full body channel paused reading, and when it is failed alone.
    body_stall: Option<(String, tokio::time::Instant)>,
    registered: bool,
    dead: Option<String>,
    /// Messages encoded outside the relay's scheduler (responses, `gateway_hello_ack`), in order.
    outbox: VecDeque<WsMessage>,
    outbox_bytes: usize,
    owe_ping: bool,
    ending: Option<Ending>,
    rings: RingSampler,
    observed_pause: Option<bool>,
    /// Plain HTTP requests refused while draining, answered 503 by the next settle.
    pub(super) refused: Vec<String>,
    /// Requests granted response credit: send what they stashed at the next settle.
    pub(super) credit_ready: Vec<String>,
    /// The writer waits for [`Driver::transmit_wanted`].
    writer_idle: bool,
    /// Wake-ups owed by the current call, fired once the lock is released.
    wake: Wakeups,
}

/// The agent's relay and request table and the tasks that drive them. See the module docs.
pub(crate) struct Driver {
    locked: Locked<Core>,
    pub(crate) shared: Shared,
}

pub(crate) fn json_string(s: JsonStr<'_>) -> String {
    s.chars().collect()
}

impl Driver {
    /// A driver for `relay` and `requests`; no session yet.
    pub(crate) fn new(
        relay: Box<AgentRelay>,
        requests: Box<AgentRequests>,
        shared: Shared,
    ) -> Arc<Self> {
        let scratch = vec![0u8; relay.config().max_message];
        let txbuf = vec![0u8; relay.max_transmit_len()];
        Arc::new_cyclic(|me| {
            let core = Core {
                me: me.clone(),
                relay,
                requests,
                scratch,
                txbuf,
                session: 0,
                streams: HashMap::new(),
                orphans: Vec::new(),
                http: HashMap::new(),
                reports: None,
                pending: None,
                pause: None,
                body_wait: None,
                body_stall: None,
                registered: false,
                dead: None,
                outbox: VecDeque::new(),
                outbox_bytes: 0,
                owe_ping: false,
                ending: None,
                rings: RingSampler::default(),
                observed_pause: None,
                refused: Vec::new(),
                credit_ready: Vec::new(),
                writer_idle: false,
                wake: Wakeups::default(),
            };
            Self {
                locked: Locked::new(core),
                shared,
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.locked.lock()
    }

    /// Runs `f` on the core, settles it, then fires the wake-ups it caused (outside the lock).
    fn with<R>(&self, f: impl FnOnce(&mut Core, &Shared) -> R) -> R {
        self.locked.with(&self.shared, f)
    }

    /// Resolves once the session task should look at [`Driver::turn`] again.
    pub(crate) async fn control_wanted(&self) {
        self.locked.signals().control_wanted().await;
    }

    // ---------------------------------------------------------------------------------------------
    // The session task

    /// A session starts on a new tunnel; its request tasks report on `reports`.
    pub(crate) fn start_session(
        &self,
        info: SessionInfo,
        draining: bool,
        reports: mpsc::Sender<FromHttp>,
    ) {
        self.with(|core, shared| {
            core.reports = Some(reports);
            core.pending = None;
            core.pause = None;
            core.body_wait = None;
            core.body_stall = None;
            core.registered = false;
            core.dead = None;
            core.outbox.clear();
            core.outbox_bytes = 0;
            core.owe_ping = false;
            core.ending = None;
            core.writer_idle = false;
            core.relay.start_session(shared.now(), info);
            if draining {
                core.relay.start_draining();
            }
        });
    }

    /// The state the session task waits on.
    pub(crate) fn turn(&self) -> Turn {
        let mut core = self.lock();
        let deadline = [core.relay.poll_timeout(), core.requests.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| self.shared.deadline(t));
        Turn {
            dead: core.dead.clone(),
            reading: core.pause.is_none() && core.dead.is_none(),
            reports: core.outbox_bytes < OUTBOX_LIMIT,
            idle: core.is_idle(),
            deadline,
            body_wait: core.body_wait.take(),
            body_deadline: core.body_stall.as_ref().map(|(_, at)| *at),
        }
    }

    /// Hands in one item read from the tunnel (`None`: the connection ended). Returns whether
    /// the session task may read on.
    pub(crate) fn on_message(&self, message: Option<Result<WsMessage, WsError>>) -> bool {
        self.with(|core, shared| {
            if let Err(reason) = core.on_tunnel_message(shared, message) {
                core.dead = Some(reason);
            }
            core.pause.is_none() && core.dead.is_none()
        })
    }

    /// A request task's report.
    pub(crate) fn on_report(&self, report: FromHttp) {
        self.with(|core, shared| core.on_http(shared, report));
    }

    /// A timer came due.
    pub(crate) fn on_timeout(&self) {
        self.with(|core, shared| {
            let now = shared.now();
            core.relay.handle_timeout(now);
            core.requests.handle_timeout(now);
        });
    }

    /// The request body channel that paused reading has room.
    pub(crate) fn on_body_room(&self) {
        self.with(|core, shared| core.resume_pending(shared, Pause::Body));
    }

    /// The request body channel that paused reading had no room for the relay's pause limit:
    /// that request fails alone (504) and reading resumes.
    pub(crate) fn on_body_overdue(&self) {
        self.with(|core, shared| core.fail_stalled_body(shared));
    }

    /// The shutdown signal came: take nothing new, let live streams finish.
    pub(crate) fn start_draining(&self, grace: std::time::Duration) {
        self.with(|core, shared| {
            info!(
                streams = core.streams.len(),
                requests = core.http.len(),
                grace_s = grace.as_secs_f64(),
                "shutting down: taking no new streams, letting live ones finish"
            );
            core.relay.start_draining();
            shared.metrics.draining.store(true, Ordering::Relaxed);
        });
    }

    /// The grace period ran out: every stream closes with 1001 both ways (a stream still
    /// dialling fails with 503), every request fails with 503; then the tunnel closes.
    pub(crate) fn end_everything(&self) {
        self.with(|core, shared| {
            warn!(
                streams = core.streams.len(),
                requests = core.http.len(),
                "shutdown grace period over: closing what is still live"
            );
            core.end_everything(shared);
            core.end(Some(GRACE_OVER));
        });
    }

    /// Ends the session: with a close frame (1001, `reason`) after what is owed, or (`None`) now.
    pub(crate) fn end(&self, close: Option<&str>) {
        self.with(|core, _| core.end(close));
    }

    /// After the session: open upstreams are told to close (1001), dials and requests are
    /// abandoned, the cores learn the tunnel is lost. Returns whether the control plane accepted
    /// the registration during the session.
    pub(crate) fn lose(&self) -> bool {
        self.with(|core, shared| {
            core.shutdown(shared);
            let now = shared.now();
            core.relay.handle_tunnel_lost(now);
            while core.relay.poll_event().is_some() {}
            core.requests.handle_tunnel_lost();
            core.registered
        })
    }
}

impl Schedule for Driver {
    /// The next message for the tunnel socket: a ping, what was encoded outside the scheduler,
    /// the request table's replies, then what the relay's scheduler picks.
    fn next_out(&self) -> Next {
        self.locked.next_out(&self.shared)
    }

    fn writer_failed(&self, error: &WsError) {
        self.with(|core, _| {
            if core.dead.is_none() {
                core.dead = Some(format!("tunnel write failed: {error}"));
            }
            core.ending = Some(Ending::Now);
            core.wake.control = true;
        });
    }

    fn transmit_wanted(&self) -> impl Future<Output = ()> + Send {
        self.locked.signals().transmit_wanted()
    }
}

impl DriverCore for Core {
    type Ctx = Shared;

    fn settle(&mut self, ctx: &Shared) {
        Self::settle(self, ctx);
    }

    fn wakeups(&mut self) -> &mut Wakeups {
        &mut self.wake
    }

    fn next_out(&mut self, ctx: &Shared) -> Next {
        Self::next_out(self, ctx)
    }

    fn set_writer_idle(&mut self, idle: bool) {
        self.writer_idle = idle;
    }
}

impl Core {
    /// Drains the cores' events, routing each to the task it concerns, answers what the last
    /// input made due, and catches the metrics up. Called at the end of every [`Driver::with`].
    fn settle(&mut self, shared: &Shared) {
        for id in std::mem::take(&mut self.credit_ready) {
            self.drain_stash(&id);
        }
        for id in std::mem::take(&mut self.refused) {
            let unix = unix_now();
            let r = self
                .requests
                .encode_response_failed(&id, 503, DRAINING, unix, &mut self.txbuf);
            self.response_written(&id, r.map(|n| (0, n)));
        }
        loop {
            let mut progressed = false;
            while let Some(event) = self.requests.poll_event() {
                progressed = true;
                let RequestEvent::Abandon(id) = event;
                self.http.remove(id.as_str());
                // An upgrade that timed out before the upstream answered: end its stream too.
                if self.streams.get(id.as_str()).is_some_and(|h| h.upgrade) {
                    self.close_stream_from_agent(shared, id.as_str());
                }
            }
            while let Some(event) = self.relay.poll_event() {
                progressed = true;
                self.on_relay_event(shared, event);
            }
            if !progressed {
                break;
            }
        }
        if self.relay.is_draining() && self.is_idle() {
            // The session ends once nothing is live: tell it.
            self.wake.control = true;
        }
        if self.writer_idle {
            // Whatever changed may have made a message due; the writer finds out.
            self.writer_idle = false;
            self.wake.writer = true;
        }
        let metrics = &shared.metrics;
        metrics.set_relay(self.relay.stats());
        metrics.set_requests(self.requests.stats());
        let paused = self.pause.is_some();
        let rings = self.rings.due();
        if rings || self.observed_pause != Some(paused) {
            self.observed_pause = Some(paused);
            metrics.observe_relay(&self.relay, paused, rings);
        }
    }

    /// Nothing live: no stream, no request, nothing owed to the control plane.
    fn is_idle(&self) -> bool {
        self.streams.is_empty()
            && self.http.is_empty()
            && self.refused.is_empty()
            && self.relay.stream_count() == 0
            && self.requests.is_empty()
    }

    fn end(&mut self, close: Option<&str>) {
        self.ending = Some(match close {
            Some(reason) => Ending::Close(CloseFrame {
                code: CloseCode::Away,
                reason: reason.to_string().into(),
            }),
            None => Ending::Now,
        });
        self.wake.writer = true;
    }

    /// Queues a message the writer sends before the relay's scheduled ones.
    pub(super) fn push_out(&mut self, message: WsMessage) {
        self.outbox_bytes += message.len();
        self.outbox.push_back(message);
        self.wake.writer = true;
    }

    /// Queues `txbuf[..n]` (an encoded envelope) for the tunnel.
    pub(super) fn push_txbuf(&mut self, n: usize) {
        if let Some(message) = self.txbuf_message(n) {
            self.push_out(message);
        }
    }

    fn next_out(&mut self, shared: &Shared) -> Next {
        if matches!(self.ending, Some(Ending::Now)) {
            return Next::Finish;
        }
        if std::mem::take(&mut self.owe_ping) {
            return Next::Send(WsMessage::Ping(Bytes::new()));
        }
        if let Some(message) = self.outbox.pop_front() {
            let before = self.outbox_bytes;
            self.outbox_bytes -= message.len();
            if before >= OUTBOX_LIMIT && self.outbox_bytes < OUTBOX_LIMIT {
                self.wake.control = true;
            }
            return Next::Send(message);
        }
        let unix = unix_now();
        let reply = self.requests.poll_transmit(unix, &mut self.txbuf);
        if self.pause == Some(Pause::Requests) {
            // The reply queue has room again (or never will without more input): retry.
            self.resume_pending(shared, Pause::Requests);
        }
        match reply {
            Ok(Some(n)) => {
                if let Some(message) = self.txbuf_message(n) {
                    return Next::Send(message);
                }
            }
            Ok(None) => {}
            Err(e) => warn!("cannot encode a request reply: {e:?}"),
        }
        let now = shared.now();
        match self.relay.poll_transmit_owned(now, unix, &mut self.txbuf) {
            Ok(Some(Transmit::Encoded(n))) => {
                if let Some(message) = self.txbuf_message(n) {
                    return Next::Send(message);
                }
            }
            Ok(Some(Transmit::Data { header, payload })) => {
                return Next::Send(WsMessage::Binary(Buf::frame(&header, &payload)));
            }
            Ok(None) => {}
            // Cannot happen with a buffer of max_transmit_len; never spin on it.
            Err(e) => warn!("cannot encode a tunnel message: {e}"),
        }
        if let Some(Ending::Close(frame)) = self.ending.take() {
            self.ending = Some(Ending::Now);
            return Next::Send(WsMessage::Close(Some(frame)));
        }
        Next::Idle
    }

    fn txbuf_message(&self, n: usize) -> Option<WsMessage> {
        let bytes = &self.txbuf[..n];
        if tether_core::wire::native::is_native(bytes) {
            return Some(WsMessage::binary(bytes.to_vec()));
        }
        match std::str::from_utf8(bytes) {
            Ok(t) => Some(WsMessage::text(t)),
            Err(_) => {
                warn!("dropping a non-UTF-8 envelope (encoder bug)");
                None
            }
        }
    }

    fn on_relay_event(&mut self, shared: &Shared, event: Event) {
        match event {
            Event::Registered {
                cluster_id,
                extensions,
            } => {
                let wire = if extensions.native {
                    "native"
                } else {
                    "compat"
                };
                info!(
                    cluster_id = cluster_id.as_str(),
                    wire, "registered with the control plane"
                );
                self.registered = true;
                shared.metrics.connected.store(true, Ordering::Relaxed);
            }
            Event::SendPing => {
                self.owe_ping = true;
                self.wake.writer = true;
            }
            Event::TunnelDead => {
                self.dead = Some("tunnel silent past the read deadline".into());
                self.wake.control = true;
            }
            Event::PauseTunnelReads => {
                if self.pause.is_none() {
                    self.pause = Some(Pause::Relay);
                }
            }
            Event::ResumeTunnelReads => self.resume_pending(shared, Pause::Relay),
            Event::DataForUpstream(id) => {
                if let Some(waker) = self
                    .streams
                    .get_mut(id.as_str())
                    .and_then(|h| h.recv.take())
                {
                    self.wake.wakers.push(waker);
                }
            }
            Event::CloseUpstream { stream, close } => {
                let id = stream.as_str();
                let reason = close.reason.as_str().to_string();
                match self.streams.get_mut(id) {
                    Some(h) if h.open => {
                        // Given to the task once the relay's data for it is out.
                        h.close = Some((close.code, reason));
                        if let Some(waker) = h.recv.take() {
                            self.wake.wakers.push(waker);
                        }
                    }
                    _ => {
                        // Still dialling (dropping the entry aborts the dial), or gone.
                        let upgrade = self.streams.remove(id).is_some_and(|h| h.upgrade);
                        let _ = self.relay.handle_upstream_closed(
                            shared.now(),
                            id,
                            close.code,
                            &reason,
                        );
                        if upgrade {
                            let _ =
                                self.requests
                                    .upgrade_failed(id, 504, "upstream dial abandoned");
                        }
                    }
                }
            }
            // The port finds out itself: its message comes back `Full` and it waits for resume.
            Event::StopReadingUpstream(_) => {}
            Event::ResumeReadingUpstream(id) => {
                if let Some(waker) = self
                    .streams
                    .get_mut(id.as_str())
                    .and_then(|h| h.send.take())
                {
                    self.wake.wakers.push(waker);
                }
            }
        }
    }

    pub(super) fn resume_pending(&mut self, shared: &Shared, reason: Pause) {
        if self.pause != Some(reason) {
            return;
        }
        if reason == Pause::Body {
            self.body_stall = None;
        }
        self.pause = None;
        self.wake.control = true;
        if let Some(frame) = self.pending.take() {
            self.on_tunnel(shared, frame);
        }
    }

    /// See [`Driver::on_body_overdue`]. The parked chunk belonged to the failed request: it and
    /// the request's later chunks are dropped.
    fn fail_stalled_body(&mut self, shared: &Shared) {
        if self.pause != Some(Pause::Body) {
            return;
        }
        let Some((id, _)) = self.body_stall.take() else {
            return;
        };
        let limit = self.relay.config().pause_limit;
        warn!(
            request = id.as_str(),
            limit_s = limit.as_millis() as f64 / 1000.0,
            "the Kubernetes API stopped taking the request body: failing this request alone, the tunnel reads on"
        );
        let secs = limit.as_millis() as f64 / 1000.0;
        let message = format!("the Kubernetes API took no more of the request body for {secs:.1}s");
        let r =
            self.requests
                .encode_response_failed(&id, 504, &message, unix_now(), &mut self.txbuf);
        self.response_written(&id, r.map(|n| (0, n)));
        self.http.remove(&id);
        self.pending = None;
        self.body_wait = None;
        self.resume_pending(shared, Pause::Body);
    }

    // ---------------------------------------------------------------------------------------------
    // Tunnel input

    /// Acts on one item read from the tunnel (`None`: the connection ended). `Err` ends the
    /// session with that reason.
    fn on_tunnel_message(
        &mut self,
        shared: &Shared,
        message: Option<Result<WsMessage, WsError>>,
    ) -> Result<(), String> {
        match message {
            Some(Ok(WsMessage::Text(text))) => self.on_tunnel(shared, Vec::from(text.as_bytes())),
            Some(Ok(WsMessage::Binary(bytes)))
                if self.relay.is_native() && tether_core::wire::native::is_data(&bytes) =>
            {
                let now = shared.now();
                match self.relay.handle_native_data(now, Buf(bytes.clone())) {
                    Ok(()) => {}
                    // Only when the reply queue is full: the usual path parks it and pauses.
                    Err(TunnelError::Blocked) => self.on_tunnel(shared, bytes.to_vec()),
                    Err(e) => {
                        shared.metrics.tunnel_error(&e);
                        debug!("native data frame refused: {e}");
                    }
                }
            }
            Some(Ok(WsMessage::Binary(bytes))) => self.on_tunnel(shared, bytes.to_vec()),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {
                self.relay.handle_tunnel_activity(shared.now());
            }
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(format!(
                    "control plane closed the tunnel{}",
                    frame
                        .map(|f| format!(" ({} {})", u16::from(f.code), f.reason))
                        .unwrap_or_default()
                ));
            }
            Some(Err(e)) => return Err(format!("tunnel read failed: {e}")),
            None => return Err("tunnel connection closed".to_string()),
        }
        Ok(())
    }

    fn on_tunnel(&mut self, shared: &Shared, frame: Vec<u8>) {
        let now = shared.now();
        let result = self
            .relay
            .handle_tunnel_message(now, &frame, &mut self.scratch);
        if let Err(e) = &result {
            shared.metrics.tunnel_error(e);
        }
        match result {
            Ok(Handled::Start(start)) if self.relay.is_draining() => {
                let id = start.stream.as_str().to_string();
                info!(stream = id.as_str(), "stream refused: draining");
                let _ = self.relay.handle_upstream_failed(now, &id, 503, DRAINING);
            }
            Ok(Handled::Start(start)) => {
                let mut spec = stream_spec(
                    start.stream.as_str(),
                    start.path,
                    start.query,
                    start.headers,
                    start.protocol,
                );
                spec.raw = start.upgrade;
                self.spawn_stream(shared, spec, false);
            }
            Ok(Handled::Consumed) => {}
            Ok(Handled::Other(env, inbound)) => {
                let id = env.request_id.map(json_string).unwrap_or_default();
                match inbound {
                    Inbound::ProxyRequest(req) => {
                        let unix = unix_now();
                        match self.requests.handle_request(now, unix, &env, &req) {
                            Ok(start) if self.relay.is_draining() => {
                                let id = start.id.as_str().to_string();
                                info!(request = id.as_str(), "request refused: draining");
                                if start.websocket {
                                    let _ = self.requests.upgrade_failed(&id, 503, DRAINING);
                                } else {
                                    self.refused.push(id);
                                }
                            }
                            Ok(start) => self.start_request(shared, start),
                            Err(RequestError::Blocked) => {
                                self.pending = Some(frame.clone());
                                self.pause = Some(Pause::Requests);
                            }
                            Err(e) => debug!(request = id.as_str(), "refused: {e}"),
                        }
                    }
                    Inbound::ProxyRequestChunk { data } => {
                        let Some(h) = self.http.get(&id) else {
                            debug!(
                                request = id.as_str(),
                                "chunk for an unknown request dropped"
                            );
                            return;
                        };
                        let Some(body) = h.body.clone() else {
                            let e = self
                                .requests
                                .handle_chunk(now, &id, data, &mut self.scratch);
                            debug!(request = id.as_str(), "chunk refused: {e:?}");
                            return;
                        };
                        if body.is_closed() {
                            return;
                        }
                        if body.capacity() == 0 {
                            // Stop reading the tunnel until the request task takes a chunk.
                            self.pending = Some(frame.clone());
                            self.pause = Some(Pause::Body);
                            let at = shared.deadline(now + self.relay.config().pause_limit);
                            self.body_stall = Some((id.clone(), at));
                            self.body_wait = Some(Box::pin(async move {
                                let _ = body.reserve_owned().await;
                            }));
                            self.wake.control = true;
                            return;
                        }
                        // Only this driver sends on `body`, under its lock: the room is there.
                        let Ok(permit) = body.try_reserve() else {
                            return;
                        };
                        match self
                            .requests
                            .handle_chunk(now, &id, data, &mut self.scratch)
                        {
                            Ok(bytes) => permit.send(Bytes::copy_from_slice(bytes)),
                            Err(RequestError::Blocked) => {
                                drop(permit);
                                self.pending = Some(frame.clone());
                                self.pause = Some(Pause::Requests);
                            }
                            Err(e) => warn!(request = id.as_str(), "request chunk refused: {e}"),
                        }
                    }
                    Inbound::ProxyRequestStreamEnd => match self.requests.handle_stream_end(&id) {
                        Ok(()) => {
                            if let Some(h) = self.http.get_mut(&id) {
                                h.body = None;
                            }
                        }
                        Err(e) => debug!(request = id.as_str(), "stream end refused: {e}"),
                    },
                    Inbound::ProxyResponseCredit { bytes, messages } => {
                        debug!(request = id.as_str(), bytes, messages, "response credit");
                        if self.requests.handle_credit(now, &id, bytes, messages) {
                            self.credit_ready.push(id.clone());
                        }
                    }
                    Inbound::ProxyCancel => match self.requests.handle_cancel(&id) {
                        Cancelled::Request => {
                            self.http.remove(&id);
                        }
                        Cancelled::Upgrade => self.close_stream_from_agent(shared, &id),
                        Cancelled::Unknown => {
                            // A live stream started by proxy_websocket_start may be cancelled too.
                            if self.streams.contains_key(&id) {
                                self.close_stream_from_agent(shared, &id);
                            }
                        }
                    },
                    Inbound::TcpTunnelStart(start) => {
                        // Raw TCP reaches beyond the Kubernetes API: only to the targets the
                        // operator allowed (`--allow-tcp`); anything else is refused
                        // (`tcp_tunnel_close {reason: connection_failed}`).
                        if let Ok(req) = self.relay.start_tcp_tunnel(now, &env, &start) {
                            let id = req.tunnel.as_str().to_string();
                            let (host, port) = (req.host.as_str().to_string(), req.port);
                            let allowed = shared.allow_tcp.iter().any(|t| t.allows(&host, port));
                            if allowed && !self.relay.is_draining() {
                                info!(tunnel = id.as_str(), target = %format!("{host}:{port}"), "TCP tunnel");
                                let spec = StreamSpec {
                                    id,
                                    path: String::new(),
                                    query: String::new(),
                                    headers: Vec::new(),
                                    protocols: Vec::new(),
                                    raw: None,
                                    tcp: Some((host, port)),
                                };
                                self.spawn_stream(shared, spec, false);
                            } else {
                                let why = if allowed {
                                    DRAINING.to_string()
                                } else {
                                    format!(
                                        "TCP to {host}:{port} is not allowed on this agent (--allow-tcp)"
                                    )
                                };
                                warn!(tunnel = id.as_str(), "TCP tunnel refused: {why}");
                                let _ = self.relay.handle_upstream_failed(now, &id, 403, &why);
                            }
                        }
                    }
                    Inbound::RegisterSuccess(_) => {}
                    Inbound::GatewayHello(_) => {
                        // No yamux: tell the gateway so, and stay on JSON.
                        let unix = unix_now();
                        match (Outbound::GatewayHelloAck { use_yamux: false }).encode(
                            None,
                            unix,
                            &mut self.txbuf,
                        ) {
                            Ok(n) => self.push_txbuf(n),
                            Err(e) => warn!("cannot encode gateway_hello_ack: {e:?}"),
                        }
                    }
                    Inbound::Error { error } => {
                        let error = error.map(json_string).unwrap_or_default();
                        warn!("control plane reported an error: {error}");
                    }
                    other => {
                        debug!("ignoring unsupported message type {}", other.type_name());
                    }
                }
            }
            Err(TunnelError::Blocked) => {
                self.pending = Some(frame);
                self.pause = Some(Pause::Relay);
            }
            Err(TunnelError::ScratchTooSmall { needed }) => {
                // A caller bug: grow and retry once rather than lose the message.
                self.scratch.resize(needed, 0);
                self.on_tunnel(shared, frame);
            }
            Err(e) => debug!("tunnel message refused: {e}"),
        }
    }

    /// Closes the relay stream `id` as if the control plane had sent `proxy_websocket_close`.
    pub(super) fn close_stream_from_agent(&mut self, shared: &Shared, id: &str) {
        if let Err(e) = self.relay.close_stream(shared.now(), id, None) {
            debug!(stream = id, "close refused: {e}");
        }
    }

    /// Starts the task of a relay stream (`upgrade`: started by a `proxy_request` upgrade).
    pub(super) fn spawn_stream(&mut self, shared: &Shared, spec: StreamSpec, upgrade: bool) {
        let kind = if spec.tcp.is_some() {
            StreamKind::Tcp
        } else {
            StreamKind::WebSocket
        };
        let Some(driver) = self.me.upgrade() else {
            return;
        };
        let key = spec.id.clone();
        let port = Port {
            driver,
            id: key.as_str().into(),
            session: self.session,
        };
        let task = tokio::spawn(upstream::run(
            shared.kube.clone(),
            spec,
            port,
            self.relay.config().max_message,
        ));
        self.streams.insert(
            key,
            StreamEntry {
                task: Some(AbortOnDrop::new(task)),
                open: false,
                upgrade,
                settled: false,
                close: None,
                close_given: false,
                recv: None,
                send: None,
                _life: shared.metrics.stream_life(kind),
            },
        );
    }

    /// The grace period ran out: see [`Driver::end_everything`].
    fn end_everything(&mut self, shared: &Shared) {
        let now = shared.now();
        let ids: Vec<String> = self.streams.keys().cloned().collect();
        for id in ids {
            let Some(h) = self.streams.get_mut(&id) else {
                continue;
            };
            let upgrade = h.upgrade;
            if h.open {
                if !h.close_given {
                    h.close = Some((1001, GRACE_OVER.into()));
                }
                h.settled = true;
                if let Some(task) = h.task.take() {
                    task.detach();
                }
                self.wake.wakers.extend(h.recv.take());
                self.wake.wakers.extend(h.send.take());
                let _ = self
                    .relay
                    .handle_upstream_closed(now, &id, 1001, GRACE_OVER);
            } else {
                self.streams.remove(&id);
                let _ = self.relay.handle_upstream_failed(now, &id, 503, GRACE_OVER);
            }
            if upgrade {
                let _ = self.requests.upgrade_failed(&id, 503, GRACE_OVER);
            }
        }
        let ids: Vec<String> = self.http.keys().cloned().collect();
        for id in ids {
            self.on_http(
                shared,
                FromHttp::Failed {
                    id,
                    status: 503,
                    message: GRACE_OVER.into(),
                },
            );
        }
    }

    /// The session is over: open upstreams are told to close (1001) and finish on their own,
    /// dials are abandoned, requests dropped.
    fn shutdown(&mut self, shared: &Shared) {
        for (id, mut h) in self.streams.drain() {
            if !h.open {
                // Dropping the entry aborts the dial.
                continue;
            }
            if !h.close_given && h.close.is_none() {
                h.close = Some((1001, "tunnel lost".into()));
            }
            h.settled = true;
            if let Some(task) = h.task.take() {
                task.detach();
            }
            self.wake.wakers.extend(h.recv.take());
            self.wake.wakers.extend(h.send.take());
            self.orphans.push((self.session, id.into(), h));
        }
        // From here on every port of the ended session finds its stream among the orphans.
        self.session += 1;
        self.http.clear();
        self.reports = None;
        self.pending = None;
        self.pause = None;
        self.body_wait = None;
        self.body_stall = None;
        shared.metrics.connected.store(false, Ordering::Relaxed);
    }

    // ---------------------------------------------------------------------------------------------
    // Stream tasks

    /// The entry of stream `id` of `session`: this session's, or one left from an earlier one.
    fn entry(&mut self, session: u64, id: &str) -> Option<&mut StreamEntry> {
        if session == self.session {
            return self.streams.get_mut(id);
        }
        self.orphans
            .iter_mut()
            .find(|(s, i, _)| *s == session && &**i == id)
            .map(|(_, _, h)| h)
    }

    fn remove_entry(&mut self, session: u64, id: &str) -> Option<StreamEntry> {
        if session == self.session {
            return self.streams.remove(id);
        }
        let at = self
            .orphans
            .iter()
            .position(|(s, i, _)| *s == session && &**i == id)?;
        Some(self.orphans.swap_remove(at).2)
    }

    fn poll_upstream(
        &mut self,
        shared: &Shared,
        session: u64,
        id: &str,
        cx: &Context<'_>,
    ) -> Poll<Option<ToUpstream>> {
        let Some(h) = self.entry(session, id) else {
            return Poll::Ready(None);
        };
        if !h.settled
            && let Some(m) = self.relay.pop_upstream(id)
        {
            shared
                .metrics
                .bytes_to_upstream
                .fetch_add(m.payload.0.len() as u64, Ordering::Relaxed);
            return Poll::Ready(Some(ToUpstream::Message(m.kind, m.payload.0)));
        }
        let Some(h) = self.entry(session, id) else {
            return Poll::Ready(None);
        };
        if let Some((code, reason)) = h.close.take() {
            h.close_given = true;
            return Poll::Ready(Some(ToUpstream::Close(code, reason)));
        }
        h.recv = Some(cx.waker().clone());
        Poll::Pending
    }

    fn push_upstream(
        &mut self,
        shared: &Shared,
        session: u64,
        id: &str,
        kind: MessageKind,
        payload: &mut Option<Bytes>,
        cx: &Context<'_>,
    ) -> Poll<Result<(), Gone>> {
        let Some(h) = self.entry(session, id) else {
            return Poll::Ready(Err(Gone));
        };
        let Some(bytes) = payload.take() else {
            return Poll::Ready(Ok(()));
        };
        if h.settled {
            // Nothing carries it any more; the stream is closing.
            return Poll::Ready(Ok(()));
        }
        let len = bytes.len() as u64;
        let now = shared.now();
        match self
            .relay
            .handle_upstream_message(now, id, kind, Buf(bytes))
        {
            Ok(()) => {
                shared
                    .metrics
                    .bytes_to_tunnel
                    .fetch_add(len, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Err(SendError::Full(bytes)) => {
                *payload = Some(bytes.0);
                if let Some(h) = self.streams.get_mut(id) {
                    h.send = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(SendError::TooLarge(_)) => {
                warn!(
                    stream = id,
                    "upstream message too large; closing the stream"
                );
                if let Some(h) = self.streams.get_mut(id)
                    && !h.close_given
                {
                    h.close = Some((1009, "message too large".into()));
                    self.wake.wakers.extend(h.recv.take());
                }
                Poll::Ready(Ok(()))
            }
            // The stream's tunnel side is gone: nothing can carry it; its close follows.
            Err(_) => Poll::Ready(Ok(())),
        }
    }

    fn upstream_started(&mut self, shared: &Shared, session: u64, id: &str, sub: Option<&str>) {
        let Some(h) = self.entry(session, id) else {
            return;
        };
        h.open = true;
        if let Some(task) = h.task.take() {
            // From now on the task ends its upstream politely on its own.
            task.detach();
        }
        if h.settled {
            return;
        }
        let upgrade = h.upgrade;
        if self
            .relay
            .handle_upstream_started(shared.now(), id, sub)
            .is_err()
            && let Some(h) = self.streams.get_mut(id)
            && !h.close_given
        {
            // The stream was closed meanwhile: close the upstream.
            h.close = Some((1001, "stream closed".into()));
            self.wake.wakers.extend(h.recv.take());
        }
        if upgrade {
            let _ = self.requests.upgrade_started(id, sub);
        }
    }

    fn upstream_failed(
        &mut self,
        shared: &Shared,
        session: u64,
        id: &str,
        status: u16,
        message: &str,
    ) {
        shared
            .metrics
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
        let Some(mut h) = self.remove_entry(session, id) else {
            return;
        };
        if let Some(task) = h.task.take() {
            // The task is reporting: let it end by itself.
            task.detach();
        }
        if h.settled {
            return;
        }
        let _ = self
            .relay
            .handle_upstream_failed(shared.now(), id, status, message);
        if h.upgrade {
            let _ = self.requests.upgrade_failed(id, status, message);
        }
    }

    fn upstream_closed(
        &mut self,
        shared: &Shared,
        session: u64,
        id: &str,
        code: u16,
        reason: &str,
    ) {
        let live = match self.remove_entry(session, id) {
            Some(h) => !h.settled,
            None => session == self.session,
        };
        if live {
            let _ = self
                .relay
                .handle_upstream_closed(shared.now(), id, code, reason);
        }
    }
}

/// The stream's entry is gone: its task ends.
#[derive(Debug)]
pub(crate) struct Gone;

/// A stream task's handle on the driver: its stream's data both ways, its lifecycle reports.
pub(crate) struct Port {
    driver: Arc<Driver>,
    id: Arc<str>,
    session: u64,
}

impl Port {
    /// The next thing to do toward the upstream, in order: the relay's data, then the close;
    /// `None` once the stream is gone (end the upstream with 1001).
    pub(crate) async fn recv(&self) -> Option<ToUpstream> {
        poll_fn(|cx| {
            self.driver
                .with(|core, shared| core.poll_upstream(shared, self.session, &self.id, cx))
        })
        .await
    }

    /// Hands a message the upstream sent to the relay; waits while the stream's ring toward the
    /// tunnel is full. `Err` once the stream is gone.
    pub(crate) async fn send(&self, kind: MessageKind, payload: Bytes) -> Result<(), Gone> {
        let mut payload = Some(payload);
        poll_fn(|cx| {
            self.driver.with(|core, shared| {
                core.push_upstream(shared, self.session, &self.id, kind, &mut payload, cx)
            })
        })
        .await
    }

    /// The upstream answered (with this subprotocol).
    pub(crate) fn started(&self, subprotocol: Option<&str>) {
        self.driver.with(|core, shared| {
            core.upstream_started(shared, self.session, &self.id, subprotocol);
        });
    }

    /// The upstream refused (its HTTP status) or could not be reached (502/504).
    pub(crate) fn failed(&self, status: u16, message: &str) {
        self.driver.with(|core, shared| {
            core.upstream_failed(shared, self.session, &self.id, status, message);
        });
    }

    /// The upstream is closed (after everything it sent was handed in).
    pub(crate) fn closed(&self, code: u16, reason: &str) {
        self.driver.with(|core, shared| {
            core.upstream_closed(shared, self.session, &self.id, code, reason);
        });
    }
}

/// The wire's headers as owned name/value pairs, one per value.
pub(super) fn header_pairs(headers: tether_core::wire::Headers<'_>) -> Vec<(String, String)> {
    headers
        .iter()
        .flat_map(|(n, values)| {
            let n = json_string(n);
            values
                .map(move |v| (n.clone(), json_string(v)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What to dial for a stream the relay started.
pub(super) fn stream_spec(
    id: &str,
    path: JsonStr<'_>,
    query: JsonStr<'_>,
    headers: tether_core::wire::Headers<'_>,
    protocol: Option<JsonStr<'_>>,
) -> StreamSpec {
    let pairs = header_pairs(headers);
    let protocol = protocol.map(json_string);
    let protocols = headers::offered_subprotocols(
        protocol.as_deref(),
        pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
    );
    StreamSpec {
        id: id.to_string(),
        path: json_string(path),
        query: json_string(query),
        headers: headers::forward_request_headers(
            pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        ),
        protocols,
        raw: None,
        tcp: None,
    }
}
