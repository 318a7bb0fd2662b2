//! The session task: owns the relay, the request table and the tunnel socket for one connection.
//!
//! It selects over the tunnel (read only while the relay allows), events from the per-stream and
//! per-request tasks, the earliest core timer, and (when tunnel reading waits for a request body
//! to drain) that body's channel. After every input it drains the cores' outputs: events are acted
//! on, transmits are written to the tunnel. No protocol decision is taken here.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tether_core::relay::{
    Event, Handled, MessageKind, SendError, SessionInfo, Transmit, TunnelError,
};
use tether_core::request::{Cancelled, RequestBody, RequestError, RequestEvent, ResponseError};
use tether_core::wire::{Body, Inbound, JsonStr, Outbound, UnixTime};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, info, warn};

use super::http::{self, AbortOnDrop, HttpSpec};
use super::metrics::{RingSampler, StreamKind};
use super::tunnel::TunnelSocket;
use super::upstream::{self, StreamCtl, StreamSpec, ToUpstream};
use super::{AgentRelay, AgentRequests, Drain, Shared};
use crate::buf::Buf;
use crate::kube::headers;

/// Commands queued per stream task (beyond this the relay's ring holds the data).
const STREAM_QUEUE: usize = 16;
/// Request body chunks queued per request task (beyond this tunnel reading pauses).
const BODY_QUEUE: usize = 16;
/// Events from all tasks to the session.
const EVENT_QUEUE: usize = 64;
/// What a stream or request that arrives while the agent drains is told (HTTP 503).
const DRAINING: &str = "the agent is shutting down; retry to reach another agent of the cluster";
/// Why live streams end when the shutdown grace period runs out (close 1001).
const GRACE_OVER: &str = "agent shutting down: grace period over";

/// Largest response body buffered for a client that did not ask for streamed responses.
const MAX_BUFFERED_RESPONSE: usize = 8 << 20;
/// Tunnel bytes written before the session looks at its inputs again. The relay decides what to
/// send next (interactive messages first) only when asked, so an input that arrives while a
/// large backlog is written must not wait for all of it: at most this much goes ahead of it.
const FLUSH_BUDGET: usize = 64 * 1024;

/// What a stream or request task reports.
#[derive(Debug)]
pub(crate) enum FromTask {
    /// The upstream answered 101 with this subprotocol.
    Started {
        id: String,
        subprotocol: Option<String>,
    },
    /// The upstream refused (its HTTP status) or could not be reached (502/504).
    Failed {
        id: String,
        status: u16,
        message: String,
    },
    /// A whole message read from the upstream.
    Data {
        id: String,
        kind: MessageKind,
        payload: Bytes,
    },
    /// The task wrote a message after the session found its queue full.
    Drained { id: String },
    /// The upstream WebSocket is closed.
    Closed {
        id: String,
        code: u16,
        reason: String,
    },
    /// The HTTP response header.
    HttpHeader {
        id: String,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
    },
    /// A piece of the HTTP response body.
    HttpChunk { id: String, data: Bytes },
    /// The HTTP response is complete.
    HttpEnd { id: String },
    /// The HTTP exchange failed.
    HttpFailed {
        id: String,
        status: u16,
        message: String,
    },
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) struct SessionEnd {
    /// The control plane accepted the registration during this session.
    pub(crate) registered: bool,
    /// One line.
    pub(crate) reason: String,
}

struct StreamHandle {
    commands: mpsc::Sender<ToUpstream>,
    ctl: Arc<StreamCtl>,
    task: Option<AbortOnDrop>,
    /// The upstream answered 101.
    open: bool,
    /// Messages read from the upstream that the relay refused as full, in order.
    backlog: VecDeque<(MessageKind, Bytes)>,
    /// The upstream closed while `backlog` still held messages.
    closed: Option<(u16, String)>,
    /// Started by a `proxy_request` upgrade: report the outcome to the request table too.
    upgrade: bool,
}

struct Buffered {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

struct HttpHandle {
    _task: AbortOnDrop,
    body: Option<mpsc::Sender<Bytes>>,
    buffered: Option<Buffered>,
    /// Response body read while the control plane's credit for it was used up
    /// (`response_credit`), in order; the task does not read more meanwhile.
    stash: VecDeque<Bytes>,
    /// The response ended while `stash` still held body: end it once that is out.
    ended: bool,
    /// Stops and resumes the task's reading of the response body.
    ctl: Arc<StreamCtl>,
}

/// Why tunnel reading is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    /// The relay refused a message as blocked: wait for `ResumeTunnelReads`.
    Relay,
    /// The request table's reply queue was full: retry after the next flush.
    Requests,
    /// A request body channel is full: wait for room.
    Body,
}

type Sink = SplitSink<TunnelSocket, Message>;
type BodyWait = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(crate) struct Session<'a> {
    relay: &'a mut AgentRelay,
    requests: &'a mut AgentRequests,
    shared: &'a Shared,
    scratch: &'a mut Vec<u8>,
    txbuf: &'a mut Vec<u8>,
    sink: Sink,
    events_tx: mpsc::Sender<FromTask>,
    streams: HashMap<String, StreamHandle>,
    http: HashMap<String, HttpHandle>,
    pending: Option<Vec<u8>>,
    pause: Option<Pause>,
    body_wait: Option<BodyWait>,
    registered: bool,
    dead: Option<String>,
    /// Envelopes encoded outside the cores (`gateway_hello_ack`), written by the next flush.
    outbox: VecDeque<String>,
    /// The last flush stopped at [`FLUSH_BUDGET`] with more to write.
    backlog: bool,
    /// When the ring gauges were last sampled (a walk over every stream).
    rings: RingSampler,
    /// Plain HTTP requests refused while draining, answered 503 by the next flush.
    refused: Vec<String>,
    /// Requests granted response credit since the last flush: send what they stashed.
    credit_ready: Vec<String>,
}

fn unix_now() -> UnixTime {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    UnixTime::new(d.as_secs(), d.subsec_nanos())
}

fn json_string(s: JsonStr<'_>) -> String {
    s.chars().collect()
}

/// Runs one session on a connected tunnel until it ends; the caller then tells the cores the
/// tunnel is lost.
///
/// Once `drain` is signalled the relay tells the control plane it drains, new streams and
/// requests get 503, and the session ends (closing the tunnel with 1001) as soon as nothing is
/// live, or when the grace period runs out, after closing what is left with 1001.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    relay: &mut AgentRelay,
    requests: &mut AgentRequests,
    shared: &Shared,
    scratch: &mut Vec<u8>,
    txbuf: &mut Vec<u8>,
    ws: TunnelSocket,
    info: SessionInfo,
    drain: &mut Drain,
) -> SessionEnd {
    let (sink, mut source) = ws.split();
    let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
    let mut s = Session {
        relay,
        requests,
        shared,
        scratch,
        txbuf,
        sink,
        events_tx,
        streams: HashMap::new(),
        http: HashMap::new(),
        pending: None,
        pause: None,
        body_wait: None,
        registered: false,
        dead: None,
        outbox: VecDeque::new(),
        backlog: false,
        rings: RingSampler::default(),
        refused: Vec::new(),
        credit_ready: Vec::new(),
    };
    let now = shared.now();
    s.relay.start_session(now, info);
    if drain.requested() {
        s.relay.start_draining();
    }
    let reason = loop {
        if let Err(e) = s.flush().await {
            break e;
        }
        if let Some(reason) = s.dead.take() {
            break reason;
        }
        if drain.requested() && s.is_idle() {
            break s
                .close_tunnel("agent drained: nothing live, shutting down")
                .await;
        }
        let grace_over = drain.deadline();
        let deadline = [s.relay.poll_timeout(), s.requests.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| shared.deadline(t));
        let reading = s.pause.is_none();
        tokio::select! {
            () = std::future::ready(()), if s.backlog => s.backlog = false,
            message = source.next(), if reading => {
                // Read every frame already received, so the socket's receive buffer does not
                // become a first-come queue in front of the relay's scheduler.
                let mut next = Some(message);
                let mut taken = 0;
                let mut ended = None;
                while let Some(message) = next {
                    if let Err(reason) = s.on_tunnel_message(message) {
                        ended = Some(reason);
                        break;
                    }
                    taken += 1;
                    next = if taken < EVENT_QUEUE && s.pause.is_none() {
                        source.next().now_or_never()
                    } else {
                        None
                    };
                }
                if let Some(reason) = ended {
                    break reason;
                }
            }
            event = events_rx.recv() => {
                // Take what the stream tasks queued at once: in the relay's rings it is
                // scheduled (interactive first); in this channel it is first come, first served.
                let mut next = event;
                let mut taken = 0;
                let mut failed = None;
                while let Some(event) = next {
                    if let Err(e) = s.on_task(event).await {
                        failed = Some(e);
                        break;
                    }
                    taken += 1;
                    next = if taken < EVENT_QUEUE { events_rx.try_recv().ok() } else { None };
                }
                if let Some(e) = failed {
                    break e;
                }
            }
            () = sleep_until(deadline) => {
                let now = shared.now();
                s.relay.handle_timeout(now);
                s.requests.handle_timeout(now);
            }
            () = wait_body(&mut s.body_wait) => {
                s.body_wait = None;
                s.resume_pending(Pause::Body);
            }
            () = drain.signalled() => {
                info!(
                    streams = s.streams.len(),
                    requests = s.http.len(),
                    grace_s = drain.grace().as_secs_f64(),
                    "shutting down: taking no new streams, letting live ones finish"
                );
                s.relay.start_draining();
                s.shared.metrics.draining.store(true, Ordering::Relaxed);
            }
            () = sleep_until(grace_over) => {
                warn!(
                    streams = s.streams.len(),
                    requests = s.http.len(),
                    "shutdown grace period over: closing what is still live"
                );
                if let Err(e) = s.end_everything().await {
                    break e;
                }
                if let Err(e) = s.flush().await {
                    break e;
                }
                break s.close_tunnel(GRACE_OVER).await;
            }
        }
    };
    let registered = s.registered;
    s.shutdown();
    SessionEnd { registered, reason }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn wait_body(wait: &mut Option<BodyWait>) {
    match wait {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    // ---------------------------------------------------------------------------------------------
    // Outputs

    /// Acts on every core event and writes owed tunnel messages until nothing is left or
    /// [`FLUSH_BUDGET`] bytes were written; then `backlog` says more is owed, and the session
    /// reads its inputs before writing on.
    async fn flush(&mut self) -> Result<(), String> {
        for id in std::mem::take(&mut self.credit_ready) {
            self.drain_stash(&id).await?;
        }
        for id in std::mem::take(&mut self.refused) {
            let unix = unix_now();
            let r = self
                .requests
                .encode_response_failed(&id, 503, DRAINING, unix, self.txbuf);
            self.response_written(&id, r.map(|n| (0, n))).await?;
        }
        loop {
            let mut progressed = false;
            while let Some(event) = self.requests.poll_event() {
                progressed = true;
                let RequestEvent::Abandon(id) = event;
                self.http.remove(id.as_str());
                // An upgrade that timed out before the upstream answered: end its stream too.
                if self.streams.get(id.as_str()).is_some_and(|h| h.upgrade) {
                    self.close_stream_from_agent(id.as_str());
                }
            }
            while let Some(event) = self.relay.poll_event() {
                progressed = true;
                self.on_relay_event(event).await?;
            }
            while let Some(text) = self.outbox.pop_front() {
                progressed = true;
                self.sink
                    .feed(Message::text(text))
                    .await
                    .map_err(|e| format!("tunnel write failed: {e}"))?;
            }
            let unix = unix_now();
            let mut written = 0;
            loop {
                if written >= FLUSH_BUDGET {
                    self.backlog = true;
                    break;
                }
                match self.requests.poll_transmit(unix, self.txbuf) {
                    Ok(Some(n)) => {
                        progressed = true;
                        written += n;
                        self.feed(n).await?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!("cannot encode a request reply: {e:?}");
                        break;
                    }
                }
            }
            loop {
                if written >= FLUSH_BUDGET {
                    self.backlog = true;
                    break;
                }
                let now = self.shared.now();
                match self.relay.poll_transmit_owned(now, unix, self.txbuf) {
                    Ok(Some(Transmit::Encoded(n))) => {
                        progressed = true;
                        written += n;
                        self.feed(n).await?;
                    }
                    Ok(Some(Transmit::Data { header, payload })) => {
                        progressed = true;
                        written += header.len() + payload.0.len();
                        self.sink
                            .feed(Message::Binary(Buf::frame(&header, &payload)))
                            .await
                            .map_err(|e| format!("tunnel write failed: {e}"))?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Cannot happen with a buffer of max_transmit_len; never spin on it.
                        warn!("cannot encode a tunnel message: {e}");
                        break;
                    }
                }
            }
            if self.pause == Some(Pause::Requests) {
                progressed = true;
                self.resume_pending(Pause::Requests);
            }
            self.shared.metrics.set_relay(self.relay.stats());
            self.shared.metrics.set_requests(self.requests.stats());
            self.shared
                .metrics
                .observe_relay(self.relay, self.pause.is_some(), self.rings.due());
            if !progressed || self.dead.is_some() || self.backlog {
                break;
            }
        }
        self.sink
            .flush()
            .await
            .map_err(|e| format!("tunnel write failed: {e}"))
    }

    /// Queues `txbuf[..n]` (a JSON envelope) on the tunnel.
    async fn feed(&mut self, n: usize) -> Result<(), String> {
        let bytes = &self.txbuf[..n];
        let message = if tether_core::wire::native::is_native(bytes) {
            Message::binary(bytes.to_vec())
        } else {
            match std::str::from_utf8(bytes) {
                Ok(t) => Message::text(t),
                Err(_) => {
                    warn!("dropping a non-UTF-8 envelope (encoder bug)");
                    return Ok(());
                }
            }
        };
        self.sink
            .feed(message)
            .await
            .map_err(|e| format!("tunnel write failed: {e}"))
    }

    async fn on_relay_event(&mut self, event: Event) -> Result<(), String> {
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
                self.shared.metrics.connected.store(true, Ordering::Relaxed);
            }
            Event::SendPing => {
                self.sink
                    .feed(Message::Ping(Bytes::new()))
                    .await
                    .map_err(|e| format!("tunnel write failed: {e}"))?;
            }
            Event::TunnelDead => {
                self.dead = Some("tunnel silent past the read deadline".into());
            }
            Event::PauseTunnelReads => {
                if self.pause.is_none() {
                    self.pause = Some(Pause::Relay);
                }
            }
            Event::ResumeTunnelReads => self.resume_pending(Pause::Relay),
            Event::DataForUpstream(id) => self.pump(id.as_str()),
            Event::CloseUpstream { stream, close } => {
                let id = stream.as_str();
                let reason = close.reason.as_str().to_string();
                let gone = match self.streams.get_mut(id) {
                    Some(h) if h.open && h.closed.is_none() => {
                        match h
                            .commands
                            .try_send(ToUpstream::Close(close.code, reason.clone()))
                        {
                            Ok(()) => false,
                            Err(mpsc::error::TrySendError::Full(command)) => {
                                // Keep the order behind the queued messages without blocking.
                                let tx = h.commands.clone();
                                tokio::spawn(async move {
                                    let _ = tx.send(command).await;
                                });
                                false
                            }
                            // The task already ended; its `Closed` report settles the stream.
                            Err(mpsc::error::TrySendError::Closed(_)) => false,
                        }
                    }
                    // Still dialling (abandon the dial), or the upstream already closed.
                    Some(_) => true,
                    None => true,
                };
                if gone {
                    let h = self.streams.remove(id);
                    let (code, why) = h
                        .as_ref()
                        .and_then(|h| h.closed.clone())
                        .unwrap_or((close.code, reason));
                    let now = self.shared.now();
                    let _ = self.relay.handle_upstream_closed(now, id, code, &why);
                    if h.is_some_and(|h| h.upgrade && !h.open) {
                        let _ = self
                            .requests
                            .upgrade_failed(id, 504, "upstream dial abandoned");
                    }
                }
            }
            Event::StopReadingUpstream(id) => {
                if let Some(h) = self.streams.get(id.as_str()) {
                    h.ctl.paused.store(true, Ordering::Release);
                }
            }
            Event::ResumeReadingUpstream(id) => self.resume_upstream(id.as_str()),
        }
        Ok(())
    }

    /// Moves messages from the relay to the stream task while its queue has room.
    fn pump(&mut self, id: &str) {
        let Some(h) = self.streams.get(id) else {
            return;
        };
        loop {
            match h.commands.try_reserve() {
                Ok(permit) => match self.relay.pop_upstream(id) {
                    Some(m) => {
                        self.shared
                            .metrics
                            .bytes_to_upstream
                            .fetch_add(m.payload.0.len() as u64, Ordering::Relaxed);
                        permit.send(ToUpstream::Message(m.kind, m.payload.0));
                    }
                    None => break,
                },
                Err(mpsc::error::TrySendError::Full(())) => {
                    h.ctl.stalled.store(true, Ordering::Release);
                    // The task may have drained everything before seeing the flag.
                    if h.commands.capacity() == 0 {
                        break;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(())) => break,
            }
        }
    }

    /// The relay has room again for `id`: hand in the backlog, then let the task read again.
    fn resume_upstream(&mut self, id: &str) {
        let now = self.shared.now();
        let Some(h) = self.streams.get_mut(id) else {
            return;
        };
        while let Some((kind, payload)) = h.backlog.pop_front() {
            let len = payload.len() as u64;
            match self
                .relay
                .handle_upstream_message(now, id, kind, Buf(payload))
            {
                Ok(()) => {
                    self.shared
                        .metrics
                        .bytes_to_tunnel
                        .fetch_add(len, Ordering::Relaxed);
                }
                Err(SendError::Full(p)) => {
                    h.backlog.push_front((kind, p.0));
                    return;
                }
                Err(_) => {
                    // The stream's tunnel side is gone: nothing can carry the rest.
                    h.backlog.clear();
                }
            }
        }
        if let Some((code, reason)) = h.closed.take() {
            self.streams.remove(id);
            let _ = self.relay.handle_upstream_closed(now, id, code, &reason);
            return;
        }
        h.ctl.paused.store(false, Ordering::Release);
        h.ctl.resume.notify_one();
    }

    fn resume_pending(&mut self, reason: Pause) {
        if self.pause != Some(reason) {
            return;
        }
        self.pause = None;
        if let Some(frame) = self.pending.take() {
            self.on_tunnel(frame);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Tunnel input

    /// Acts on one item read from the tunnel (`None`: the connection ended). `Err` ends the
    /// session with that reason.
    fn on_tunnel_message(
        &mut self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), String> {
        match message {
            Some(Ok(Message::Text(text))) => self.on_tunnel(Vec::from(text.as_bytes())),
            Some(Ok(Message::Binary(bytes)))
                if self.relay.is_native() && tether_core::wire::native::is_data(&bytes) =>
            {
                self.on_native_data(bytes);
            }
            Some(Ok(Message::Binary(bytes))) => self.on_tunnel(bytes.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                self.relay.handle_tunnel_activity(self.shared.now());
            }
            Some(Ok(Message::Close(frame))) => {
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

    /// A native data frame: handed to the relay without copying its payload.
    fn on_native_data(&mut self, frame: bytes::Bytes) {
        let now = self.shared.now();
        match self.relay.handle_native_data(now, Buf(frame.clone())) {
            Ok(()) => {}
            // Only when the reply queue is full: the usual path parks it and pauses.
            Err(TunnelError::Blocked) => self.on_tunnel(frame.to_vec()),
            Err(e) => {
                self.shared.metrics.tunnel_error(&e);
                debug!("native data frame refused: {e}");
            }
        }
    }

    fn on_tunnel(&mut self, frame: Vec<u8>) {
        let now = self.shared.now();
        let result = self.relay.handle_tunnel_message(now, &frame, self.scratch);
        if let Err(e) = &result {
            self.shared.metrics.tunnel_error(e);
        }
        match result {
            Ok(Handled::Start(start)) if self.relay.is_draining() => {
                let id = start.stream.as_str();
                info!(stream = id, "stream refused: draining");
                let _ = self.relay.handle_upstream_failed(now, id, 503, DRAINING);
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
                self.spawn_stream(spec, false);
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
                            Ok(start) => self.start_request(start),
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
                            let e = self.requests.handle_chunk(now, &id, data, self.scratch);
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
                            self.body_wait = Some(Box::pin(async move {
                                let _ = body.reserve_owned().await;
                            }));
                            return;
                        }
                        // Only this task sends on `body`: the room seen above is still there.
                        let Ok(permit) = body.try_reserve() else {
                            return;
                        };
                        match self.requests.handle_chunk(now, &id, data, self.scratch) {
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
                        Cancelled::Upgrade => self.close_stream_from_agent(&id),
                        Cancelled::Unknown => {
                            // A live stream started by proxy_websocket_start may be cancelled too.
                            if self.streams.contains_key(&id) {
                                self.close_stream_from_agent(&id);
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
                            let allowed =
                                self.shared.allow_tcp.iter().any(|t| t.allows(&host, port));
                            if allowed && !self.relay.is_draining() {
                                info!(tunnel = id.as_str(), target = %format!("{host}:{port}"), "TCP tunnel");
                                let spec = StreamSpec {
                                    id: id.clone(),
                                    path: String::new(),
                                    query: String::new(),
                                    headers: Vec::new(),
                                    protocols: Vec::new(),
                                    raw: None,
                                    tcp: Some((host, port)),
                                };
                                self.spawn_stream(spec, false);
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
                        self.owe_gateway_ack();
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
                self.on_tunnel(frame);
            }
            Err(e) => debug!("tunnel message refused: {e}"),
        }
    }

    fn owe_gateway_ack(&mut self) {
        let unix = unix_now();
        match (Outbound::GatewayHelloAck { use_yamux: false }).encode(None, unix, self.txbuf) {
            Ok(n) => {
                // Written by the next flush (the sink is async, this path is not).
                let text = String::from_utf8_lossy(&self.txbuf[..n]).into_owned();
                self.outbox.push_back(text);
            }
            Err(e) => warn!("cannot encode gateway_hello_ack: {e:?}"),
        }
    }

    /// Closes the relay stream `id` as if the control plane had sent `proxy_websocket_close`.
    fn close_stream_from_agent(&mut self, id: &str) {
        let now = self.shared.now();
        if let Err(e) = self.relay.close_stream(now, id, None) {
            debug!(stream = id, "close refused: {e}");
        }
    }

    fn start_request(&mut self, start: tether_core::request::RequestStart<'_>) {
        let id = start.id.as_str().to_string();
        let header_pairs: Vec<(String, String)> = start
            .headers
            .iter()
            .flat_map(|(n, values)| {
                let n = json_string(n);
                values
                    .map(move |v| (n.clone(), json_string(v)))
                    .collect::<Vec<_>>()
            })
            .collect();
        if start.websocket {
            let now = self.shared.now();
            let started = self.relay.start_stream(
                now,
                &start.id,
                start.path,
                start.query,
                start.headers,
                start.protocol,
            );
            match started {
                Ok(s) => {
                    let spec =
                        stream_spec(s.stream.as_str(), s.path, s.query, s.headers, s.protocol);
                    self.spawn_stream(spec, true);
                }
                Err(e) => {
                    let status = match e {
                        TunnelError::DuplicateStream => 409,
                        TunnelError::TooManyStreams | TunnelError::Blocked => 503,
                        _ => 400,
                    };
                    let _ = self.requests.upgrade_failed(&id, status, &e.to_string());
                }
            }
            return;
        }
        let headers = headers::forward_request_headers(
            header_pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        );
        let (body, body_tx) = match start.body {
            RequestBody::None => (http::RequestBody::Empty, None),
            RequestBody::Inline(b) => (http::RequestBody::Full(Some(self.inline_body(b))), None),
            RequestBody::Streamed => {
                let (tx, rx) = mpsc::channel(BODY_QUEUE);
                (http::RequestBody::Stream(rx), Some(tx))
            }
        };
        let spec = HttpSpec {
            id: id.clone(),
            method: start.method,
            path: json_string(start.path),
            query: json_string(start.query),
            headers,
            body,
        };
        let ctl = Arc::new(StreamCtl::default());
        let run = http::run(
            self.shared.kube.clone(),
            spec,
            self.events_tx.clone(),
            ctl.clone(),
        );
        let task = tokio::spawn(self.shared.metrics.timed(StreamKind::Http, run));
        self.http.insert(
            id,
            HttpHandle {
                _task: AbortOnDrop::new(task),
                body: body_tx,
                buffered: None,
                stash: VecDeque::new(),
                ended: false,
                ctl,
            },
        );
    }

    fn inline_body(&mut self, body: Body<'_>) -> Bytes {
        match body {
            Body::Text(s) => Bytes::from(json_string(s)),
            Body::Json(v) => {
                let raw = match v {
                    tether_core::wire::json::JsonValue::Object(o) => o.raw(),
                    tether_core::wire::json::JsonValue::Array(a) => a.raw(),
                    _ => "",
                };
                Bytes::copy_from_slice(raw.as_bytes())
            }
            Body::Base64(b) => match b.decode_into(self.scratch) {
                Ok(bytes) => Bytes::copy_from_slice(bytes),
                Err(e) => {
                    // The wire decoder accepted the envelope; a bad body is the sender's bug.
                    warn!("inline request body is not valid base64 ({e}); sending it empty");
                    Bytes::new()
                }
            },
        }
    }

    fn spawn_stream(&mut self, spec: StreamSpec, upgrade: bool) {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let kind = if spec.tcp.is_some() {
            StreamKind::Tcp
        } else {
            StreamKind::WebSocket
        };
        let ctl = Arc::new(StreamCtl::new(&self.shared.metrics, kind));
        let id = spec.id.clone();
        let task = tokio::spawn(upstream::run(
            self.shared.kube.clone(),
            spec,
            rx,
            ctl.clone(),
            self.events_tx.clone(),
            self.relay.config().max_message,
        ));
        self.streams.insert(
            id,
            StreamHandle {
                commands: tx,
                ctl,
                task: Some(AbortOnDrop::new(task)),
                open: false,
                backlog: VecDeque::new(),
                closed: None,
                upgrade,
            },
        );
    }

    // ---------------------------------------------------------------------------------------------
    // Task events

    async fn on_task(&mut self, event: FromTask) -> Result<(), String> {
        let now = self.shared.now();
        match event {
            FromTask::Started { id, subprotocol } => {
                let Some(h) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                h.open = true;
                let upgrade = h.upgrade;
                if self
                    .relay
                    .handle_upstream_started(now, &id, subprotocol.as_deref())
                    .is_err()
                {
                    // The stream was closed meanwhile: close the upstream.
                    let _ = h
                        .commands
                        .try_send(ToUpstream::Close(1001, "stream closed".into()));
                }
                if upgrade {
                    let _ = self.requests.upgrade_started(&id, subprotocol.as_deref());
                }
            }
            FromTask::Failed {
                id,
                status,
                message,
            } => {
                self.shared
                    .metrics
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(h) = self.streams.remove(&id) {
                    let _ = self
                        .relay
                        .handle_upstream_failed(now, &id, status, &message);
                    if h.upgrade {
                        let _ = self.requests.upgrade_failed(&id, status, &message);
                    }
                }
            }
            FromTask::Data { id, kind, payload } => {
                let Some(h) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if !h.backlog.is_empty() {
                    h.backlog.push_back((kind, payload));
                    return Ok(());
                }
                let len = payload.len() as u64;
                match self
                    .relay
                    .handle_upstream_message(now, &id, kind, Buf(payload))
                {
                    Ok(()) => {
                        self.shared
                            .metrics
                            .bytes_to_tunnel
                            .fetch_add(len, Ordering::Relaxed);
                    }
                    Err(SendError::Full(p)) => {
                        h.backlog.push_back((kind, p.0));
                        h.ctl.paused.store(true, Ordering::Release);
                    }
                    Err(SendError::TooLarge(_)) => {
                        warn!(
                            stream = id.as_str(),
                            "upstream message too large; closing the stream"
                        );
                        let _ = h
                            .commands
                            .try_send(ToUpstream::Close(1009, "message too large".into()));
                    }
                    Err(_) => {}
                }
            }
            FromTask::Drained { id } => self.pump(&id),
            FromTask::Closed { id, code, reason } => {
                let Some(h) = self.streams.get_mut(&id) else {
                    let _ = self.relay.handle_upstream_closed(now, &id, code, &reason);
                    return Ok(());
                };
                if h.backlog.is_empty() {
                    self.streams.remove(&id);
                    let _ = self.relay.handle_upstream_closed(now, &id, code, &reason);
                } else {
                    // Report after the backlog reached the relay: no byte is lost.
                    h.closed = Some((code, reason));
                    h.task = None;
                }
            }
            FromTask::HttpHeader {
                id,
                status,
                headers,
            } => match self.requests.is_streaming(&id) {
                Some(true) => {
                    let unix = unix_now();
                    let pairs: Vec<(&[u8], &[u8])> = headers
                        .iter()
                        .map(|(n, v)| (n.as_bytes(), v.as_slice()))
                        .collect();
                    let list: &[(&[u8], &[u8])] = &pairs;
                    let r = self
                        .requests
                        .encode_response_header(&id, status, &list, unix, self.txbuf);
                    self.response_written(&id, r.map(|n| (0, n))).await?;
                }
                Some(false) => {
                    if let Some(h) = self.http.get_mut(&id) {
                        h.buffered = Some(Buffered {
                            status,
                            headers,
                            body: Vec::new(),
                        });
                    }
                }
                None => {
                    self.http.remove(&id);
                }
            },
            FromTask::HttpChunk { id, data } => {
                self.shared
                    .metrics
                    .response_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(b) = self.http.get_mut(&id).and_then(|h| h.buffered.as_mut()) {
                    if b.body.len() + data.len() > MAX_BUFFERED_RESPONSE {
                        let unix = unix_now();
                        let r = self.requests.encode_response_failed(
                            &id,
                            502,
                            "response too large for a buffered proxy_response; ask for supports_response_streaming",
                            unix,
                            self.txbuf,
                        );
                        self.http.remove(&id);
                        self.response_written(&id, r.map(|n| (0, n))).await?;
                    } else {
                        b.body.extend_from_slice(&data);
                    }
                    return Ok(());
                }
                if let Some(h) = self.http.get_mut(&id)
                    && !h.stash.is_empty()
                {
                    h.stash.push_back(data);
                    return Ok(());
                }
                self.send_body(&id, data).await?;
            }
            FromTask::HttpEnd { id } => {
                if let Some(h) = self.http.get_mut(&id)
                    && !h.stash.is_empty()
                {
                    h.ended = true;
                    return Ok(());
                }
                let unix = unix_now();
                let buffered = self.http.remove(&id).and_then(|h| h.buffered);
                let r = match buffered {
                    Some(b) => {
                        let pairs: Vec<(&[u8], &[u8])> = b
                            .headers
                            .iter()
                            .map(|(n, v)| (n.as_bytes(), v.as_slice()))
                            .collect();
                        let list: &[(&[u8], &[u8])] = &pairs;
                        self.requests
                            .encode_response(&id, b.status, &list, &b.body, unix, self.txbuf)
                    }
                    None => self.requests.encode_response_end(&id, unix, self.txbuf),
                };
                self.response_written(&id, r.map(|n| (0, n))).await?;
            }
            FromTask::HttpFailed {
                id,
                status,
                message,
            } => {
                self.shared
                    .metrics
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.http.remove(&id);
                let unix = unix_now();
                let r = self
                    .requests
                    .encode_response_failed(&id, status, &message, unix, self.txbuf);
                self.response_written(&id, r.map(|n| (0, n))).await?;
            }
        }
        Ok(())
    }

    /// Writes an encoded response message; returns whether the request is still live.
    /// Sends `data` as response chunks of request `id` while its credit allows; what does not
    /// fit is stashed and the task stops reading the body until the next grant.
    async fn send_body(&mut self, id: &str, data: Bytes) -> Result<(), String> {
        let mut at = 0;
        while at < data.len() {
            if !self.requests.may_send_chunk(id) {
                debug!(request = id, "response credit used up: body paused");
                if let Some(h) = self.http.get_mut(id) {
                    h.ctl.paused.store(true, Ordering::Release);
                    h.stash.push_front(data.slice(at..));
                }
                return Ok(());
            }
            let unix = unix_now();
            let r = self
                .requests
                .encode_response_chunk(id, &data[at..], unix, self.txbuf);
            let used = match &r {
                Ok((used, _)) => *used,
                Err(_) => data.len() - at,
            };
            if !self.response_written(id, r).await? {
                return Ok(());
            }
            at += used;
        }
        Ok(())
    }

    /// After a grant: sends what request `id` stashed as its credit allows; once the stash is
    /// empty the task reads on (or the response ends, if it already did).
    async fn drain_stash(&mut self, id: &str) -> Result<(), String> {
        loop {
            // Out of credit again (what did not fit went back to the front): wait for the next
            // grant.
            if !self.requests.may_send_chunk(id) {
                return Ok(());
            }
            let Some(chunk) = self.http.get_mut(id).and_then(|h| h.stash.pop_front()) else {
                break;
            };
            self.send_body(id, chunk).await?;
        }
        let Some(h) = self.http.get_mut(id) else {
            return Ok(());
        };
        if h.ended {
            self.http.remove(id);
            let unix = unix_now();
            let r = self.requests.encode_response_end(id, unix, self.txbuf);
            self.response_written(id, r.map(|n| (0, n))).await?;
        } else if self.requests.may_send_chunk(id) {
            h.ctl.paused.store(false, Ordering::Release);
            h.ctl.resume.notify_one();
        }
        Ok(())
    }

    async fn response_written(
        &mut self,
        id: &str,
        result: Result<(usize, usize), ResponseError>,
    ) -> Result<bool, String> {
        match result {
            Ok((_, n)) => {
                self.feed(n).await?;
                Ok(true)
            }
            Err(ResponseError::UnknownRequest) => {
                // Cancelled or timed out: stop its upstream work.
                self.http.remove(id);
                Ok(false)
            }
            Err(e) => {
                warn!(request = id, "cannot relay the response: {e}");
                self.http.remove(id);
                Ok(false)
            }
        }
    }

    /// The tunnel is gone: open upstreams are closed politely (1001), dials and requests are
    /// abandoned.
    /// Nothing live: no stream, no request, nothing owed to the control plane.
    fn is_idle(&self) -> bool {
        self.streams.is_empty()
            && self.http.is_empty()
            && self.refused.is_empty()
            && self.relay.stream_count() == 0
            && self.requests.is_empty()
    }

    /// The grace period ran out: every stream closes with 1001 both ways (a stream still
    /// dialling fails with 503), every request fails with 503.
    async fn end_everything(&mut self) -> Result<(), String> {
        let now = self.shared.now();
        let ids: Vec<String> = self.streams.keys().cloned().collect();
        for id in ids {
            let Some(mut h) = self.streams.remove(&id) else {
                continue;
            };
            if h.open {
                let _ = h
                    .commands
                    .try_send(ToUpstream::Close(1001, GRACE_OVER.into()));
                h.ctl.paused.store(false, Ordering::Release);
                h.ctl.resume.notify_one();
                if let Some(task) = h.task.take() {
                    task.detach();
                }
                let _ = self
                    .relay
                    .handle_upstream_closed(now, &id, 1001, GRACE_OVER);
            } else {
                let _ = self.relay.handle_upstream_failed(now, &id, 503, GRACE_OVER);
            }
            if h.upgrade {
                let _ = self.requests.upgrade_failed(&id, 503, GRACE_OVER);
            }
        }
        let ids: Vec<String> = self.http.keys().cloned().collect();
        for id in ids {
            self.on_task(FromTask::HttpFailed {
                id,
                status: 503,
                message: GRACE_OVER.into(),
            })
            .await?;
        }
        Ok(())
    }

    /// Closes the tunnel with 1001 and `reason`; returns the session's end reason.
    async fn close_tunnel(&mut self, reason: &str) -> String {
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: reason.to_string().into(),
        };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        reason.to_string()
    }

    fn shutdown(&mut self) {
        for (_, mut h) in self.streams.drain() {
            if h.open
                && let Some(task) = h.task.take()
            {
                let _ = h
                    .commands
                    .try_send(ToUpstream::Close(1001, "tunnel lost".into()));
                h.ctl.paused.store(false, Ordering::Release);
                h.ctl.resume.notify_one();
                // Let it finish its close handshake on its own.
                task.detach();
            }
        }
        self.http.clear();
        self.shared
            .metrics
            .connected
            .store(false, Ordering::Relaxed);
    }
}

fn stream_spec(
    id: &str,
    path: JsonStr<'_>,
    query: JsonStr<'_>,
    headers: tether_core::wire::Headers<'_>,
    protocol: Option<JsonStr<'_>>,
) -> StreamSpec {
    let pairs: Vec<(String, String)> = headers
        .iter()
        .flat_map(|(n, values)| {
            let n = json_string(n);
            values
                .map(move |v| (n.clone(), json_string(v)))
                .collect::<Vec<_>>()
        })
        .collect();
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
